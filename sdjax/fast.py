"""Few-step presets (``sdjax generate --fast NAME``): the sampler, steps and guidance each accelerator is made for.

The accelerators themselves are ordinary files: LCM-LoRA, TCD-LoRA and Hyper-SD LoRAs load with ``--lora``
(``sdjax.lora`` reads their diffusers and kohya layouts), SD-Turbo is a whole model (``--model``). A preset
only chooses how to sample; flags the user gives explicitly win over it.

Every preset runs without classifier-free guidance (guidance 1.0: one U-Net call per step). The model cards
pass ``guidance_scale=0`` or ``1.0`` to diffusers, which skips guidance for any scale <= 1; in sdjax a scale
of 0 would instead return the unconditional prediction.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NO_GUIDANCE = 1.0
# The built-in model's LCM-LoRA, distilled by sdjax (scripts/distill_builtin_lcm.py): --fast lcm loads it
# when no --model is given.
# diffusers: pipe.load_lora_weights(folder, weight_name="builtin_lcm_lora.safetensors").
BUILTIN_LCM_LORA = Path(__file__).resolve().parent / "assets" / "builtin" / "lcm_lora" / "builtin_lcm_lora.safetensors"


@dataclass(frozen=True)
class FastPreset:
    scheduler: str
    steps: int
    guidance_scale: float = NO_GUIDANCE
    scheduler_options: tuple[tuple[str, object], ...] = ()  # sorted (name, value) pairs, as Recipe keeps them
    sd15_lora: Optional[tuple[str, str]] = None  # (hub repo id, file) of the LoRA it expects on SD 1.5
    made_for: str = ""  # what it is made for, when that is not an SD 1.5 LoRA


FAST_PRESETS = {
    # latent-consistency/lcm-lora-sdv1-5 model card: LCMScheduler, num_inference_steps=4, guidance_scale=0.
    "lcm": FastPreset("lcm", 4,
                      sd15_lora=("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors")),
    # h1t/TCD-SD15-LoRA model card: TCDScheduler, num_inference_steps=4, guidance_scale=0, eta (gamma) 0.3.
    "tcd": FastPreset("tcd", 4, scheduler_options=(("eta", 0.3),),
                      sd15_lora=("h1t/TCD-SD15-LoRA", "pytorch_lora_weights.safetensors")),
    # ByteDance/Hyper-SD model card, SD 1.5 N-step LoRAs: DDIMScheduler with timestep_spacing="trailing",
    # guidance_scale=0, N steps; the 8-step LoRA is its best few-step one (the 1-step LoRA wants tcd, eta 1.0).
    "hyper": FastPreset("ddim", 8, scheduler_options=(("timestep_spacing", "trailing"),),
                        sd15_lora=("ByteDance/Hyper-SD", "Hyper-SD15-8steps-lora.safetensors")),
    # ByteDance/SDXL-Lightning model card: EulerDiscreteScheduler with timestep_spacing="trailing",
    # guidance_scale=0, the checkpoint's step count. Its LoRAs are SDXL only.
    "lightning": FastPreset("euler", 4, scheduler_options=(("timestep_spacing", "trailing"),),
                            made_for="SDXL-Lightning (SDXL, which sdjax does not load yet)"),
    # stabilityai/sd-turbo model card: num_inference_steps=1 (up to 4), guidance_scale=0.0, with the repo's
    # EulerDiscreteScheduler, timestep_spacing "trailing". Ancestral Euler equals Euler at one step and re-noises
    # between steps, as adversarial diffusion distillation samples with more.
    "turbo": FastPreset("euler_a", 1, scheduler_options=(("timestep_spacing", "trailing"),),
                        made_for="an adversarially distilled model such as --model stabilityai/sd-turbo"),
}


class GivenFlag(argparse.Action):
    """Stores a flag's value and records that it was given, so that ``--fast`` leaves it alone."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given_flags = getattr(namespace, "given_flags", frozenset()) | {self.dest}


def apply_fast(args) -> Optional[str]:
    """Fill the sampling flags the user left out from ``args.fast``'s preset; returns a one-line note on what
    the preset expects to be loaded, or None."""
    name = getattr(args, "fast", None)
    if name is None:
        return None
    preset = FAST_PRESETS[name]
    if getattr(args, "from_png", None) is not None:
        raise ValueError(f"--fast {name} and --from-png both set the sampler and steps; give one of them")
    given = getattr(args, "given_flags", frozenset())
    if name == "lcm" and args.model is None and not args.lora and BUILTIN_LCM_LORA.is_file():
        args.lora = [str(BUILTIN_LCM_LORA)]
    if "steps" not in given:
        args.steps = preset.steps
    if args.guidance is None:
        args.guidance = preset.guidance_scale
    if "scheduler" not in given:  # the preset's options belong to its sampler: another sampler takes none of them
        args.scheduler = preset.scheduler
        options = dict(preset.scheduler_options)
        if args.timestep_spacing is not None or args.schedule_type is not None:
            options.pop("timestep_spacing", None)  # the user's spacing, or a schedule type's own sigma grid
        args.scheduler_options = options
    return _note(name, preset, args)


def _note(name: str, preset: FastPreset, args) -> Optional[str]:
    if preset.sd15_lora is not None:
        repo, file = preset.sd15_lora
        made_for = f"the {repo} LoRA ({file}) on an SD 1.5 model"
    else:
        made_for = preset.made_for
    if args.model is None:
        if name == "lcm" and args.lora == [str(BUILTIN_LCM_LORA)]:
            return "--fast lcm: with the built-in model's LCM-LoRA, distilled by sdjax"
        return (f"--fast {name}: the built-in model has no distilled LoRA for it, so few-step images will be of low "
                f"quality (the preset is made for {made_for})")
    if preset.sd15_lora is not None and not args.lora:
        return f"--fast {name} is made for {made_for}: give it with --lora"
    return None
