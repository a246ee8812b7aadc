"""Prompts as people write them in the image modes (#20): a weighted, long, BREAK prompt with a
textual-inversion token through image-to-image equals diffusers' img2img pipeline given the conditioning
of an independent implementation of A1111's rules (tests/test_prompts.py) as prompt embeddings."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import decode_unit, rel_err
from sdjax.pipeline import StableDiffusion
from test_image_modes import STEPS, SEED, draws_of, init_images, run_diffusers, torch_pipeline
from sdjax.generate import KeyStream
from test_prompts import reference_chunks, reference_conditioning, reference_parse

PROMPTS = ["a (red:1.1) <thing> on a hill, " + "tall grass, " * 30 + "BREAK [blue] sky",
           "<thing>, (a green square)"]
NEGATIVES = ["blurry, (bad:1.2)", ""]


def test_weighted_long_embedding_prompts_in_image_to_image(tiny_pipeline_dir, monkeypatch):
    from transformers import CLIPTextModel

    sd = StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)
    vectors = np.random.RandomState(4).randn(2, 32).astype(np.float32) * 0.1
    sd.add_embedding(vectors, "<thing>")
    text_model = CLIPTextModel.from_pretrained(tiny_pipeline_dir / "text_encoder").eval()
    text_model.resize_token_embeddings(49408 + 2)
    with torch.no_grad():
        text_model.get_input_embeddings().weight[49408:] = torch.from_numpy(vectors)
    names = {tuple(sd.tokenizer("<thing>", add_special_tokens=False)["input_ids"]): (49408, 49409)}
    chunks = [reference_chunks(sd.tokenizer, reference_parse(t), names) for t in PROMPTS + NEGATIVES]
    bucket = max(len(c) for c in chunks)
    assert bucket == 3  # the long prompt and its BREAK: three chunks for every prompt and negative
    embeds = [torch.from_numpy(reference_conditioning(text_model, c, bucket)).float() for c in chunks]

    pipe = torch_pipeline("StableDiffusionImg2ImgPipeline", tiny_pipeline_dir)
    noise, posterior = draws_of(2, [KeyStream.IMAGE])
    expected = run_diffusers(pipe, monkeypatch, noise, posterior,
                             prompt_embeds=torch.stack(embeds[:2]), negative_prompt_embeds=torch.stack(embeds[2:]),
                             image=init_images(), strength=0.75, guidance_scale=7.5)
    latents = sd.image_to_image(PROMPTS, init_images(), 0.75, negative_prompt=NEGATIVES, steps=STEPS, seed=SEED,
                                scheduler="pndm", latents=noise, output="latent")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"weighted long embedding prompts in img2img: rel err {err:.2e}")
    assert err < 1e-3


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
