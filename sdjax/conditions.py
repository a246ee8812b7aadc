"""Host side of the image conditions: a request's images, masks, depth maps and control images checked and
converted into the typed arrays ``sdjax.generate`` takes (``ImageCondition``, ``sdjax.control.ControlInput``).

``expand(given, name)`` in these functions maps the output images to the given items (one for all, one per
prompt or one per image: ``sdjax.images.expand_indices`` bound to the request's prompt counts).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from sdjax import images as image_inputs
from sdjax.config import UNetConfig
from sdjax.control import Control, ControlInput, check_adapter_size, control_inputs
from sdjax.controlnet import ControlNet
from sdjax.depth import DEFAULT_DEPTH_MODEL, INSTALL_HINT, DepthEstimator
from sdjax.generate import ImageCondition, Mode

Expand = Callable[[int, str], np.ndarray]


def check_unet_for(unet: UNetConfig, mode: Mode, mask=None) -> None:
    """The U-Net's input channels decide the modes it can run: latents only (ordinary), latents +
    mask + masked-image latents (inpainting), latents + depth (depth)."""
    latent, given = unet.out_channels, unet.in_channels
    inpainting, depth = 2 * latent + 1, latent + 1
    accepted = {
        Mode.TEXT_TO_IMAGE: (latent,),
        Mode.IMAGE_TO_IMAGE: (latent,),
        Mode.INPAINT: (latent, inpainting),
        Mode.DEPTH_TO_IMAGE: (depth,),
    }[mode]
    if given not in accepted:
        what = {inpainting: " (an inpainting model: use inpaint)", depth: " (a depth model: use depth_to_image)"}
        raise ValueError(
            f"{mode.value} needs a U-Net with {' or '.join(map(str, accepted))} input channels"
            + (" (latents + depth map, like stable-diffusion-2-depth)" if mode == Mode.DEPTH_TO_IMAGE else "")
            + f"; this model's U-Net takes {given}{what.get(given, '')}"
        )
    if mode == Mode.INPAINT and mask is None:
        raise ValueError(
            "inpaint needs a mask (single-channel, white = repaint, black = keep)"
            + (f"; this {given}-channel inpainting U-Net takes it as an input" if given == inpainting else "")
            + ", got mask=None"
        )


def image_condition(
    mode: Mode, given: list, size: tuple[int, int], expand: Expand, start_step: np.ndarray, *, mask=None,
    depth_map=None, binarize_mask: bool = True, keep_unmasked: bool = True,
    depth_estimator: Optional[DepthEstimator] = None, latent_factor: int = 8,
) -> ImageCondition:
    """The ``ImageCondition`` of an image-to-image, inpainting or depth-to-image request."""
    image_index = expand(len(given), "image")
    pixels = image_inputs.load_images(given, *size)
    condition = ImageCondition(pixels=pixels[image_index], start_step=start_step)
    if mode == Mode.INPAINT:
        masks = image_inputs.as_list(mask, "mask", (2, 3))
        mask_index = expand(len(masks), "mask")
        image_inputs.check_same_sizes([given[i] for i in image_index], [masks[i] for i in mask_index])
        masks = image_inputs.load_masks(masks, *size, binarize=binarize_mask)[mask_index]
        # Present either way (zero weights to skip it), so toggling keep_unmasked never recompiles.
        keep = image_inputs.keep_weights(masks) * float(bool(keep_unmasked))
        return ImageCondition(pixels=condition.pixels, start_step=start_step, mask=masks, keep=keep)
    if mode == Mode.DEPTH_TO_IMAGE:
        depth = _depth_condition(depth_map, pixels, image_index, size, expand, depth_estimator, latent_factor)
        return ImageCondition(pixels=condition.pixels, start_step=start_step, depth=depth)
    return condition


def _depth_condition(depth_map, pixels: np.ndarray, image_index: np.ndarray, size, expand: Expand,
                     depth_estimator: Optional[DepthEstimator], factor: int) -> np.ndarray:
    """(count, h, w, 1) depth in [-1, 1] at the latent size, given or estimated from the images."""
    if depth_map is None:
        if depth_estimator is None:
            raise ValueError(
                "depth_to_image needs a depth map and this model has no depth estimator: pass "
                "depth_map=(H, W) array(s) of relative depth (larger = nearer), or set "
                f"sd.depth_estimator = sdjax.depth.DepthEstimator({DEFAULT_DEPTH_MODEL!r}) ({INSTALL_HINT})"
            )
        maps, index = depth_estimator(image_inputs.to_uint8(pixels)), image_index
    else:
        maps = image_inputs.as_depth_list(depth_map)
        index = expand(len(maps), "depth map")
    return image_inputs.load_depth_maps(maps, size[0] // factor, size[1] // factor)[index]


def control_images(control: Control) -> list:
    """A control's images as a list (one for all, one per prompt or one per image)."""
    return image_inputs.as_list(control.image, "control image", (2, 3))


def control_condition(controls: Sequence[Control], size: tuple[int, int], expand: Expand, count: int,
                      factor: int) -> tuple[ControlInput, ...]:
    """Each control's ``ControlInput``: its images at the output ``size`` in [0, 1] (resized with a warning, as
    diffusers resizes them: Lanczos for PIL images, nearest for arrays), scale and start/end per image."""
    inputs = []
    for index, control in enumerate(controls):
        given = control_images(control)
        name = f"controls[{index}] image"
        image_inputs.warn_if_resized(given, size, name, factor, requested=True, why="the output size")
        model = control.model
        if isinstance(model, ControlNet):
            channels = model.config.conditioning_channels
        else:
            check_adapter_size(f"controls[{index}]", model, size)
            channels = model.config.in_channels
        images = image_inputs.load_unit_images(given, *size, name=name, channels=channels)
        inputs.append(control_inputs(control, images[expand(len(given), name)], count))
    return tuple(inputs)
