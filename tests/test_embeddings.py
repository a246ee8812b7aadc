"""Textual-inversion embeddings (#20): the file layouts, diffusers' load_textual_inversion parity, bad input."""

import numpy as np
import jax.numpy as jnp
import pytest
import torch
from safetensors.torch import save_file

from reference import decode_unit, nchw, rel_err
from sdjax import prompt
from sdjax.pipeline import StableDiffusion

WIDTH = 32  # the tiny pipeline's text encoder


@pytest.fixture()
def sd(tiny_pipeline_dir):
    return StableDiffusion.from_pretrained(tiny_pipeline_dir, dtype=jnp.float32)


def vectors(count=2, seed=0, width=WIDTH):
    return torch.from_numpy(np.random.RandomState(seed).randn(count, width).astype(np.float32) * 0.1)


def a1111_pt(path, v, name="mytok"):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone().requires_grad_(True)},
                "name": name, "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, path)
    return path


def test_a1111_pt_and_its_safetensors_twin_load_the_same_vectors(sd, tmp_path):
    v = vectors()
    pt = a1111_pt(tmp_path / "my-style.pt", v)
    save_file({"emb_params": v}, tmp_path / "my-style.safetensors")
    assert sd.load_embedding(pt) == "my-style"  # the file stem, as A1111 names it
    from_pt = np.asarray(sd.params["embeddings"])
    assert sd.load_embedding(tmp_path / "my-style.safetensors") == "my-style"  # same name: replaced
    assert sd.embeddings == {"my-style": 2}
    assert np.array_equal(from_pt, v.numpy()) and np.array_equal(np.asarray(sd.params["embeddings"]), from_pt)


def test_other_layouts(sd, tmp_path):
    v = vectors(3, seed=1)
    old = torch.nn.ParameterDict({"*": torch.nn.Parameter(v)})  # A1111 files from 2022 pickled a ParameterDict
    torch.save({"string_to_param": old, "name": "old"}, tmp_path / "oldstyle.pt")
    save_file({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.safetensors")  # diffusers: {token: (D,)}
    torch.save({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.bin")
    save_file({"clip_l": v[:2], "clip_g": torch.zeros(2, 1280)}, tmp_path / "xlstyle.safetensors")
    assert sd.load_embedding(tmp_path / "oldstyle.pt") == "oldstyle"
    assert sd.load_embedding(tmp_path / "learned_embeds.safetensors", token="<cat-toy>") == "<cat-toy>"
    assert sd.load_embedding(tmp_path / "learned_embeds.bin", token="<cat-toy-2>") == "<cat-toy-2>"
    assert sd.load_embedding(tmp_path / "xlstyle.safetensors") == "xlstyle"
    assert sd.embeddings == {"oldstyle": 3, "<cat-toy>": 1, "<cat-toy-2>": 1, "xlstyle": 2}
    table = np.asarray(sd.params["embeddings"])
    assert np.array_equal(table, np.concatenate([v.numpy(), v[:1].numpy(), v[:1].numpy(), v[:2].numpy()]))
    sd.unload_embedding("oldstyle")
    assert sd.embeddings == {"<cat-toy>": 1, "<cat-toy-2>": 1, "xlstyle": 2} and sd.params["embeddings"].shape == (4, 32)
    sd.unload_embedding()
    assert "embeddings" not in sd.params and sd.embeddings == {}


def test_token_ids_anywhere_in_a_prompt_weighted_or_not(sd, tmp_path):
    sd.load_embedding(a1111_pt(tmp_path / "easyneg.pt", vectors(2)))
    vocab = sd.config.text_encoder.vocab_size
    cond, _ = sd.tokenize_prompts(["a easyneg, (easyneg:1.3) cat", "easyneg", "[easyneg]"], [""])
    ids, weights = cond.ids, cond.weights
    assert ids[0, :9].tolist()[1:8] == [320, vocab, vocab + 1, 267, vocab, vocab + 1, 2368]
    assert weights[0, 5:7].tolist() == pytest.approx([1.3, 1.3]) and weights[0, 2:4].tolist() == [1.0, 1.0]
    assert ids[1, 1:4].tolist() == [vocab, vocab + 1, 49407]
    assert weights[2, 1:3].tolist() == pytest.approx([1 / 1.1, 1 / 1.1])


def test_an_embedding_never_straddles_two_chunks(sd, tmp_path):
    sd.load_embedding(a1111_pt(tmp_path / "widestyle.pt", vectors(4)))
    cond, _ = sd.tokenize_prompts([" ".join(["word"] * 73) + " widestyle"], [""])
    first = cond.ids[0, 1:76].tolist()
    assert cond.chunks == (2,) and sd.config.text_encoder.vocab_size not in first
    assert cond.ids[0, 78:82].tolist() == list(range(49408, 49412))


def test_matches_diffusers_load_textual_inversion(sd, tiny_pipeline_dir, tmp_path):
    import diffusers

    v = vectors(2, seed=3)
    save_file({"<cat-toy>": v}, tmp_path / "learned_embeds.safetensors")  # a two-vector diffusers file
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    sd.load_embedding(tmp_path / "learned_embeds.safetensors", token="<cat-toy>")
    prompts, negatives = ["a <cat-toy> on a hill", "<cat-toy>"], ["blurry", "a <cat-toy>"]
    noise = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        expected = pipe(prompts, negative_prompt=negatives, num_inference_steps=6, guidance_scale=7.5,
                        latents=nchw(noise), output_type="np").images
    latents = sd.text_to_image(prompts, negatives, steps=6, guidance_scale=7.5, scheduler="ddim", latents=noise,
                               output="latent", prompt_syntax="plain")
    err = rel_err(decode_unit(sd, latents), expected)
    print(f"textual inversion vs diffusers: rel err {err:.2e}")
    assert err < 1e-3


def test_loading_compiles_once_and_prompts_with_it_do_not_recompile(sd, tmp_path):
    run = dict(steps=2, scheduler="ddim", output="latent")
    sd.load_embedding(a1111_pt(tmp_path / "mystyle.pt", vectors(2)))
    sd.text_to_image("a cat", **run)
    count = sd.executor.compile_count()
    sd.text_to_image("a mystyle cat", **run)
    sd.text_to_image("(mystyle:1.4), a dog", "mystyle", **run)
    assert sd.executor.compile_count() == count


def test_bad_input_is_a_clear_error(sd, tmp_path):
    save_file({"emb_params": vectors(2, width=768)}, tmp_path / "sd15.safetensors")
    with pytest.raises(ValueError, match="width 768, made for another text encoder; this model's text encoder has "
                                         "width 32"):
        sd.load_embedding(tmp_path / "sd15.safetensors")
    save_file({"clip_l": vectors(2, width=768), "clip_g": vectors(2, width=1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="SDXL embedding .*clip_l width 768.* has width 32"):
        sd.load_embedding(tmp_path / "xl.safetensors")
    a1111_pt(tmp_path / "cat.pt", vectors(1))
    with pytest.raises(ValueError, match="embedding token 'cat' is already a word of the tokenizer's vocabulary"):
        sd.load_embedding(tmp_path / "cat.pt")
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="has no known layout"):
        sd.load_embedding(tmp_path / "two.safetensors")
    with pytest.raises(FileNotFoundError, match="embedding file not found"):
        sd.load_embedding(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        (tmp_path / "x.txt").write_text("x")
        sd.load_embedding(tmp_path / "x.txt")
    assert sd.embeddings == {} and prompt.SYNTAXES == ("a1111", "compel", "plain")


def test_recipe_carries_clip_skip_and_syntax():
    from sdjax.recipe import Recipe, read_recipe

    recipe = Recipe(prompt="a (cat:1.2)", negative_prompt="", steps=3, scheduler="ddim", guidance_scale=2.0,
                    seed=1, width=64, height=64, clip_skip=2, prompt_syntax="compel")
    text = recipe.infotext()
    assert "Clip skip: 2" in text and "sdjax prompt syntax: compel" in text
    assert read_recipe(text) == recipe and read_recipe(text).generate_options()["clip_skip"] == 2
    plain = Recipe(prompt="x", negative_prompt="", steps=3, scheduler="ddim", guidance_scale=2.0, seed=1,
                   width=64, height=64)
    assert "Clip skip" not in plain.infotext() and read_recipe(plain.infotext()).clip_skip == 1
    a1111 = "a cat\nSteps: 3, Sampler: Euler a, CFG scale: 2, Seed: 7, Size: 64x64, Clip skip: 2, RNG: CPU"
    assert read_recipe(a1111).clip_skip == 2
    with pytest.raises(ValueError, match="bad Clip skip in the infotext: '0'"):
        read_recipe(a1111.replace("Clip skip: 2", "Clip skip: 0"))


def test_cli_embedding_clip_skip_and_from_png(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from sdjax import cli

    monkeypatch.setenv("SDJAX_CACHE_DIR", str(tmp_path / "cache"))
    width = StableDiffusion.default().config.text_encoder.hidden_size
    embedding = tmp_path / "shapestyle.safetensors"
    save_file({"emb_params": vectors(2, width=width)}, embedding)
    common = ["--embedding", embedding, "--steps", 2, "--size", "64x64", "--no-progress"]
    argv = ["generate", "a (shapestyle:1.2) red circle", *common, "--clip-skip", 2, "--out", tmp_path / "a"]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    (made,) = (tmp_path / "a").glob("*.png")
    assert "Clip skip: 2" in Image.open(made).text["parameters"]
    argv = ["generate", "--from-png", made, *common, "--out", tmp_path / "b"]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    (again,) = (tmp_path / "b").glob("*.png")
    assert again.read_bytes() == made.read_bytes()
    for bad, message in ((["--clip-skip", "0"], "--clip-skip must be an integer >= 1, got 0"),
                         (["--embedding", str(tmp_path / "none.pt")], "--embedding file not found")):
        code = cli.main(["generate", "x", "--out", str(tmp_path / "c"), *bad])
        assert code == 2 and message in capsys.readouterr().err
