"""Textual-inversion training (#20): the loss and its gradient against PyTorch, the training run, both file
formats (sdjax and diffusers load them), resume, the CLI and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from reference import nchw, rel_err
from sdjax import embedding_train, train
from sdjax.cli import main
from sdjax.embedding_train import EmbeddingTrainConfig, train_embedding
from sdjax.pipeline import StableDiffusion
from sdjax.schedules import training_alphas_cumprod

SIZE = 64  # the tiny pipeline's native size: 8x8 latents


@pytest.fixture()
def sd(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)


def images(count=4, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (count, SIZE, SIZE, 3)).astype(np.uint8)


def test_loss_and_gradient_match_pytorch(sd, tiny_pipeline_dir):
    """The token's loss and its gradient w.r.t. the token's vectors, with an earlier embedding loaded, equal
    diffusers' text encoder + U-Net in PyTorch with the same rows appended to the embedding table."""
    import diffusers

    sd.add_embedding(np.random.RandomState(1).randn(1, 32).astype(np.float32) * 0.1, "<earlier>")
    sd.add_embedding(embedding_train.initial_vectors(sd, "cat", 2), "<new>")
    cond, _ = sd.tokenize_prompts(["a <new> next to an <earlier>", "<new>"], [""], "plain")
    table = np.asarray(sd.params["embeddings"])
    rng = np.random.RandomState(2)
    latents = rng.randn(2, 8, 8, 4).astype(np.float32)
    noise = rng.randn(2, 8, 8, 4).astype(np.float32)
    t = np.array([10, 700])
    alphas = training_alphas_cumprod(sd.config.scheduler, zero_snr=True, terminal_fix=False)

    def loss(vectors):
        context = embedding_train.token_context(sd, sd.params["text_encoder"], jnp.asarray(cond.ids),
                                                jnp.asarray(table[:1]), vectors)
        predict = lambda x, ts: sd.unet.apply({"params": sd.params["unet"]}, x, ts, context)  # noqa: E731
        return train.denoising_loss(predict, latents, jnp.asarray(t), noise, jnp.asarray(alphas))[0]

    ours, grad = jax.value_and_grad(loss)(jnp.asarray(table[1:]))

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    encoder, unet = pipe.text_encoder, pipe.unet
    encoder.resize_token_embeddings(49408 + 3)
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[49408:] = torch.from_numpy(table.copy())
    context = encoder(torch.from_numpy(cond.ids.astype(np.int64))).last_hidden_state
    a = torch.from_numpy(alphas[t]).view(-1, 1, 1, 1)
    noisy = a.sqrt() * nchw(latents) + (1 - a).sqrt() * nchw(noise)
    expected = torch.mean((unet(noisy, torch.from_numpy(t), context).sample - nchw(noise)) ** 2)
    expected.backward()
    assert abs(float(ours) - expected.item()) / float(expected) < 1e-5
    err = rel_err(np.asarray(grad), weight.grad[49409:].numpy())
    print(f"token gradient vs PyTorch: rel err {err:.2e}")
    assert err < 1e-4


def test_training_changes_only_the_token_and_saves_both_formats(sd, tiny_pipeline_dir, tmp_path):
    import diffusers

    before = jax.tree.map(np.asarray, sd.params)
    config = EmbeddingTrainConfig(token="<my-thing>", init_word="cat", num_vectors=2, steps=3, batch_size=2,
                                  learning_rate=1e-2, log_every=1)
    start = embedding_train.initial_vectors(sd, "cat", 2)
    learned = train_embedding(sd, images(), ["a <my-thing>"] * 4, config, tmp_path / "out", progress=False)
    assert learned.vectors.shape == (2, 32) and not np.allclose(learned.vectors, start)
    assert sd.embeddings == {"<my-thing>": 2}  # left loaded for immediate use
    for part in ("text_encoder", "unet", "vae"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sd.params[part]), before[part])
    a1111, diffusers_file = tmp_path / "out" / "my-thing.safetensors", tmp_path / "out" / "learned_embeds.safetensors"
    assert [r["step"] for r in map(eval, (tmp_path / "out" / "loss.jsonl").read_text().splitlines())] == [1, 2, 3]

    fresh = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    assert fresh.load_embedding(a1111) == "my-thing"  # A1111 names it after the file
    fresh.load_embedding(diffusers_file, token="<my-thing>")
    np.testing.assert_array_equal(np.asarray(fresh.params["embeddings"]), np.concatenate([learned.vectors] * 2))

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_textual_inversion(str(diffusers_file))
    pipe.load_textual_inversion(str(a1111), token="<a1111>")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(table[-4:], np.concatenate([learned.vectors] * 2))


def test_resumed_run_equals_uninterrupted(sd, tmp_path):
    config = EmbeddingTrainConfig(token="<thing>", steps=4, batch_size=2, checkpoint_every=2, cache_latents=True)
    whole = train_embedding(sd, images(), ["a <thing>"] * 4, config, tmp_path / "whole", progress=False)
    train_embedding(sd, images(), ["a <thing>"] * 4, EmbeddingTrainConfig(**{**config.__dict__, "steps": 2}),
                    tmp_path / "split", progress=False)
    resumed = train_embedding(sd, images(), ["a <thing>"] * 4, config, tmp_path / "split", progress=False)
    np.testing.assert_allclose(resumed.vectors, whole.vectors, rtol=1e-6, atol=1e-7)


def test_template_and_bad_input(sd):
    pixels = images(2)
    with pytest.raises(ValueError, match=r"2 of 2 captions do not contain the token '<thing>'"):
        train_embedding(sd, pixels, ["a cat", "a dog"], EmbeddingTrainConfig(token="<thing>", steps=1))
    with pytest.raises(ValueError, match=r"template 'a photo' must contain \{token\}"):
        train_embedding(sd, pixels, ["a", "b"], EmbeddingTrainConfig(token="<thing>", template="a photo", steps=1))
    with pytest.raises(ValueError, match="'cat' is already a word of the tokenizer's vocabulary"):
        train_embedding(sd, pixels, ["a cat", "cat"], EmbeddingTrainConfig(token="cat", steps=1))
    with pytest.raises(ValueError, match=r"captions must fit one 77-token chunk"):
        train_embedding(sd, pixels, ["<thing> " + "word " * 80] * 2, EmbeddingTrainConfig(token="<thing>", steps=1))
    learned = train_embedding(sd, pixels, ["cat", "dog"], EmbeddingTrainConfig(
        token="<thing>", template="a photo of {token}, {caption}", steps=1, batch_size=1), progress=False)
    assert learned.vectors.shape == (1, 32)


def test_cli_train_embedding(tiny_pipeline_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, pixels in enumerate(images(2)):
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo")
    out = tmp_path / "out"
    base = ["train-embedding", "--data", str(folder), "--out", str(out), "--model", str(tiny_pipeline_dir),
            "--token", "<my-thing>", "--steps", "2", "--no-progress"]
    assert main(base) == 2  # captions without the token: a one-line error
    assert "do not contain the token '<my-thing>'" in capsys.readouterr().err
    assert main(base + ["--template", "{caption} of {token}", "--vectors", "2"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "my-thing.safetensors") in printed and (out / "learned_embeds.safetensors").is_file()
