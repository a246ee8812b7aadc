"""ControlNet training (#21): the initial ControlNet against diffusers' ``ControlNetModel.from_unet``, training
that moves only the ControlNet and lowers its loss, the CLI command and resume, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from reference import TINY_UNET, randomize_, seeded
from safetensors.numpy import load_file

from sdjax import cli, controlnet_train
from sdjax.config import ControlNetConfig, UNetConfig
from sdjax.controlnet import load_controlnet
from sdjax.controlnet_train import ControlNetTrainConfig, controlnet_from_unet, train_controlnet
from sdjax.layouts.diffusers import flax_to_torch, torch_to_flax
from sdjax.models.unet import UNet2DConditionModel
from sdjax.pipeline import StableDiffusion
from sdjax.schedules import training_alphas_cumprod

SIZE = 64  # the tiny pipeline's native size: 8x8 latents
CHANNELS = (4, 8, 8, 16)
COPIED = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
ZERO = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny pipeline with one resnet per U-Net level and one text encoder layer: training compiles faster."""
    path = tmp_path_factory.mktemp("tiny_controlnet_base")
    reference.save_pipeline(path, unet={"layers_per_block": 1}, text_encoder={"num_hidden_layers": 1})
    return path


@pytest.fixture(scope="module")
def sd(tiny_dir):
    return StableDiffusion.from_pretrained(tiny_dir, dtype=jnp.float32)


def shapes_data(count=4, seed=0):
    """Rendered shapes (the edges Canny finds are real outlines) and their captions, at the tiny model's size."""
    from sdjax import data

    images, captions, _ = data.make_dataset(count, seed, image_size=SIZE, colours=("white",),
                                            backgrounds=("black",))
    return images, controlnet_train.conditions_of(images), captions


def config(**overrides):
    return ControlNetTrainConfig(**{"conditioning_embedding_out_channels": CHANNELS, "learning_rate": 1e-3,
                                    "steps": 4, "batch_size": 2, "log_every": 1, "checkpoint_every": 2,
                                    **overrides})


def test_from_unet_matches_diffusers(tmp_path):
    from diffusers import ControlNetModel
    from diffusers import UNet2DConditionModel as TorchUNet

    seeded(0)
    torch_unet = randomize_(TorchUNet(**TINY_UNET), 0)
    torch_unet.save_pretrained(tmp_path / "unet")
    reference = ControlNetModel.from_unet(torch_unet, conditioning_embedding_out_channels=CHANNELS)
    reference.save_pretrained(tmp_path / "controlnet")
    unet_config = UNetConfig.from_diffusers_config(tmp_path / "unet" / "config.json")
    shapes = jax.eval_shape(UNet2DConditionModel(unet_config).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                            jnp.zeros((1,)), jnp.zeros((1, 1, 32)))["params"]
    unet_params = torch_to_flax(torch_unet.state_dict(), shapes)

    ours = controlnet_from_unet((unet_config, unet_params), CHANNELS)

    assert ours.config == ControlNetConfig.from_diffusers_config(tmp_path / "controlnet" / "config.json")
    theirs = {k: v.numpy() for k, v in reference.state_dict().items()}
    mine = flax_to_torch(jax.device_get(ours.params))
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].shape == value.shape, key
        if key.startswith(COPIED):
            np.testing.assert_array_equal(mine[key], value, err_msg=key)
        elif key.startswith(ZERO):
            assert not value.any() and not mine[key].any(), key
        else:  # the conditioning encoder: PyTorch's default initialisation, its own random draw
            bound = 1.0 / np.sqrt(np.prod(theirs[key.replace(".bias", ".weight")].shape[1:]))
            assert np.abs(mine[key]).max() <= bound and np.abs(mine[key]).max() > 0.5 * bound, key


def _mean_losses(sd, controlnets, images, conditions, captions):
    """The denoising loss of a fixed batch over fixed keys (no caption dropout), for each ControlNet."""
    loss_fn = controlnet_train.make_loss_fn(sd, controlnets[0].module, config(caption_dropout=0.0))
    alphas_cumprod = training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False)
    frozen = {"params": sd.params, "empty_ids": None, "alphas_cumprod": jnp.asarray(alphas_cumprod)}
    batch = {"pixels": images, "conditions": conditions, "ids": controlnet_train.tokenize_captions(sd, captions)}
    run = jax.jit(lambda p, key: loss_fn(p, frozen, batch, key)[0])
    return [float(np.mean([run(c.params, jax.random.PRNGKey(k)) for k in range(8)])) for c in controlnets]


@pytest.fixture(scope="module")
def trained(sd):
    """Four steps without a break."""
    images, conditions, captions = shapes_data()
    before = jax.tree.map(np.copy, sd.params)
    return train_controlnet(sd, images, conditions, captions, config(), progress=False), before


def test_training_moves_only_the_controlnet_and_lowers_its_loss(sd, trained):
    controlnet, before = trained
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(sd.params))  # the model is frozen
    initial = controlnet_from_unet(sd, CHANNELS)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), initial.params,
                           controlnet.params)
    assert changed["controlnet_mid_block"]["kernel"] and changed["controlnet_down_blocks_0"]["kernel"]
    assert changed["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    after, start = _mean_losses(sd, [controlnet, initial], *shapes_data())
    assert after < start


def _folder(tmp_path):
    from PIL import Image

    images, _, captions = shapes_data()
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_cli_run_resumed_gives_the_uninterrupted_result(sd, trained, tiny_dir, tmp_path):
    """Two steps by the command line, resumed to four by the API: the ControlNet of four steps without a break,
    and the folder holds it in the diffusers layout."""
    out = tmp_path / "cn"
    flags = ["--model", str(tiny_dir), "--data", str(_folder(tmp_path)), "--out", str(out), "--steps", "2",
             "--batch-size", "2", "--lr", "1e-3", "--conditioning-channels", "4,8,8,16", "--checkpoint-every", "2",
             "--log-every", "1", "--no-progress"]
    assert cli.main(["train-controlnet", *flags]) == 0
    assert load_controlnet(out).config.conditioning_embedding_out_channels == CHANNELS

    images, conditions, captions = shapes_data()
    resumed = train_controlnet(sd, images, conditions, captions, config(), out, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed.params,
                 trained[0].params)
    loaded = load_controlnet(out, dtype=jnp.float32)
    assert loaded.config == resumed.config
    jax.tree.map(np.testing.assert_array_equal, loaded.params, jax.device_get(resumed.params))
    assert set(load_file(out / "diffusion_pytorch_model.safetensors")) == set(flax_to_torch(loaded.params))
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="other settings"):
        train_controlnet(sd, images, conditions, captions, config(seed=1), out, progress=False)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_is_a_one_line_error(sd, tmp_path):
    images, conditions, captions = shapes_data()
    with pytest.raises(ValueError) as excinfo:
        train_controlnet(sd, images, conditions[:, :32, :32], captions, config(), progress=False)
    assert "the images' size" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        train_controlnet(sd, images, conditions, captions, config(conditioning_embedding_out_channels=(4, 8, 16)),
                         progress=False)
    assert "give 4 channel counts" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        train_controlnet(sd, images, conditions, captions[:1], config(), progress=False)
    assert "one caption per image" in _one_line(excinfo)
    with pytest.raises(ValueError, match="--data FOLDER or --shapes N"):
        controlnet_train.load_training_data(cli.build_parser().parse_args(["train-controlnet", "--out", str(tmp_path)]), SIZE)
    with pytest.raises(FileNotFoundError, match="no condition image"):
        args = cli.build_parser().parse_args(["train-controlnet", "--data", str(_folder(tmp_path)), "--conditions", str(tmp_path / "none"),
                                     "--out", str(tmp_path)])
        controlnet_train.load_training_data(args, SIZE)
    with pytest.raises(TypeError, match="StableDiffusion or a"):
        controlnet_from_unet("not a model")
