"""The training core: losses fall, checkpoints resume exactly, and the data-parallel modes agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from sdjax import data, parallel, train
from sdjax.config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig
from sdjax.models.clip import CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL
from sdjax.schedules import training_alphas_cumprod
from sdjax.tokenizer import load_tokenizer, tokenize

TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
UNET = UNetConfig(
    sample_size=8, block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=32, norm_num_groups=8,
)
VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)


def denoiser_setup(batch_size=16, seed=0):
    text_encoder, unet = CLIPTextModel(TEXT), UNet2DConditionModel(UNET)
    images, captions, _ = data.make_dataset(batch_size, seed=seed, image_size=16)
    latents = jnp.asarray(images[:, ::2, ::2, :3].astype(np.float32) / 127.5 - 1.0)
    latents = jnp.concatenate([latents, latents[..., :1]], axis=-1)  # 8x8x4 stand-in latents
    ids, _ = tokenize(load_tokenizer(), captions)
    empty, _ = tokenize(load_tokenizer(), [""])
    key = jax.random.PRNGKey(seed)
    params = {
        "text_encoder": text_encoder.init(key, jnp.asarray(ids[:1]))["params"],
        "unet": unet.init(key, latents[:1], jnp.zeros((1,)), jnp.zeros((1, 77, 32)))["params"],
    }
    frozen = {
        "alphas_cumprod": jnp.asarray(training_alphas_cumprod(SchedulerConfig(), zero_snr=True, terminal_fix=False)),
        "empty_ids": jnp.asarray(empty[0]),
    }

    def loss_fn(p, frozen, batch, key):
        drop_key, loss_key = jax.random.split(key)
        batch_ids = train.caption_dropout(drop_key, batch["ids"], frozen["empty_ids"], 0.1)
        context = text_encoder.apply({"params": p["text_encoder"]}, batch_ids)
        predict = lambda noisy, t: unet.apply({"params": p["unet"]}, noisy, t, context)  # noqa: E731
        return train.diffusion_loss(predict, batch["latents"], loss_key, frozen["alphas_cumprod"])

    return params, frozen, {"latents": latents, "ids": jnp.asarray(ids)}, loss_fn


def test_diffusion_loss_falls_over_50_steps():
    params, frozen, batch, loss_fn = denoiser_setup()
    optimizer = train.adamw(1e-3, warmup_steps=5)
    step = train.make_train_step(loss_fn, optimizer, ema_decay=0.9)
    state = train.init_state(params, optimizer)
    losses = []
    for i in range(50):
        # the same timesteps/noise every step, so the falling loss is learning, not luck
        state, metrics = step(state, frozen, batch, jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
    print(f"loss {np.mean(losses[:5]):.4f} -> {np.mean(losses[-5:]):.4f}")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert int(state.step) == 50
    ema_gap = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.ema_params, state.params))
    assert max(ema_gap) > 0  # EMA lags the weights


def test_vae_loss_falls():
    vae = AutoencoderKL(VAE)
    images, _, _ = data.make_dataset(8, seed=1, image_size=32)
    x = jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)
    params = vae.init(jax.random.PRNGKey(0), x[:1])["params"]
    optimizer = train.adamw(2e-3, warmup_steps=2)
    step = train.make_train_step(lambda p, f, b, k: train.vae_loss(vae, p, b, k), optimizer, ema_decay=None)
    state = train.init_state(params, optimizer, ema=False)
    losses = []
    for i in range(30):
        state, metrics = step(state, {}, x, jax.random.PRNGKey(i))
        losses.append(float(metrics["recon"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


@pytest.fixture(scope="module")
def one_device_step():
    """A small denoiser and its 1-device mesh train step, compiled once for the tests below."""
    params, frozen, batch, loss_fn = denoiser_setup(batch_size=4)
    optimizer = train.adamw(1e-3, warmup_steps=1)
    step = train.make_train_step(loss_fn, optimizer, devices=jax.devices()[:1])
    return params, frozen, batch, loss_fn, optimizer, step


def test_checkpoint_resume_continues_exactly(tmp_path, one_device_step):
    params, frozen, batch, _, optimizer, step = one_device_step
    state = train.init_state(params, optimizer)
    for i in range(2):
        state, _ = step(state, frozen, batch, jax.random.PRNGKey(i))
    train.save_checkpoint(tmp_path / "ckpt", state, extra={"note": "two steps"})
    straight, _ = step(state, frozen, batch, jax.random.PRNGKey(2))
    restored, extra = train.restore_checkpoint(tmp_path / "ckpt", train.init_state(params, optimizer))
    assert extra == {"note": "two steps"} and int(restored.step) == 2
    resumed, _ = step(restored, frozen, batch, jax.random.PRNGKey(2))
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), straight, resumed)
    assert all(jax.tree.leaves(same))


def test_bad_parallel_mode_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown parallel mode 'tpu'; accepted: mesh, pmap"):
        train.make_train_step(lambda *a: None, train.adamw(1e-3), parallel="tpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train.restore_checkpoint(tmp_path / "nothing", None)
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        train.diffusion_target(None, None, None, "x0")


def test_train_step_carries_its_data_parallel_setup():
    optimizer = train.adamw(1e-3)
    step = train.make_train_step(lambda *a: None, optimizer, devices=jax.devices()[:1])
    assert step.parallel == parallel.DataParallel(jax.devices()[:1], "mesh")
    pmap = parallel.DataParallel(mode="pmap")
    assert train.make_train_step(lambda *a: None, optimizer, parallel=pmap).parallel is pmap
    with pytest.raises(ValueError, match="not both"):
        train.make_train_step(lambda *a: None, optimizer, parallel=pmap, devices=jax.devices())


def test_pmap_step_is_the_mesh_step_with_the_device_index_folded_into_the_key(one_device_step):
    params, frozen, batch, loss_fn, optimizer, mesh_step = one_device_step
    devices = jax.devices()[:1]
    key = jax.random.PRNGKey(5)
    meshed, mesh_metrics = mesh_step(train.init_state(params, optimizer), frozen, batch, jax.random.fold_in(key, 0))
    pmap_step = train.make_train_step(loss_fn, optimizer, parallel="pmap", devices=devices)
    pmap = pmap_step.parallel
    pmapped, pmap_metrics = pmap_step(pmap.place_params(train.init_state(params, optimizer)),
                                      pmap.place_params(frozen), pmap.place_batch(batch), key)
    pmapped = pmap.unreplicate(pmapped)
    assert int(pmapped.step) == 1 and pmap_metrics["loss"].shape == (1,)
    np.testing.assert_allclose(pmap_metrics["loss"][0], mesh_metrics["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(meshed.params), jax.tree.leaves(pmapped.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_mismatched_captions_only_below_the_timestep_bound():
    context = jnp.arange(4, dtype=jnp.float32)[:, None, None] * jnp.ones((4, 3, 2))
    key = jax.random.PRNGKey(0)
    low, high = jnp.array([10, 20, 499, 0]), jnp.array([500, 900, 999, 600])
    everyone = train.mismatch_captions(key, context, low, 1.0, below=500)
    np.testing.assert_array_equal(everyone[:, 0, 0], [3, 0, 1, 2])  # each has its neighbour's caption
    np.testing.assert_array_equal(train.mismatch_captions(key, context, high, 1.0, below=500), context)
    np.testing.assert_array_equal(train.mismatch_captions(key, context, low, 0.0, below=500), context)
    many = jnp.tile(context, (250, 1, 1))
    swapped = train.mismatch_captions(key, many, jnp.zeros(1000, jnp.int32), 0.25, below=500)
    rate = float(jnp.mean(swapped[:, 0, 0] != many[:, 0, 0]))
    assert 0.2 < rate < 0.3, rate


def test_pmap_and_mesh_steps_agree_on_8_devices():
    reference.run_on_simulated_devices("multidevice_train.py", marker="TRAIN MULTIDEVICE OK", timeout=1200)
