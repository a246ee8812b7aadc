"""A LoRA really teaches the built-in model a concept it never saw (scripts/lora_new_concept.py)."""

import importlib.util
from pathlib import Path

import pytest

from sdjax.pipeline import builtin_model_dir

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lora_new_concept.py"


def load_script():
    spec = importlib.util.spec_from_file_location("lora_new_concept", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not (builtin_model_dir() / "model_index.json").is_file(), reason="the built-in model is not built")
def test_lora_teaches_purple():
    script = load_script()
    from sdjax.pipeline import StableDiffusion

    ceiling = script.vae_ceiling(StableDiffusion.default(), "purple")
    if ceiling < 0.9:
        pytest.skip(f"the built-in VAE reconstructs only {ceiling:.0%} of purple shapes as purple: no U-Net or "
                    "text-encoder LoRA can reach 80% before the VAE is trained on the full palette")
    # Half the script's batch and prompts, for CI time (measured: purple 0% -> 100%, old concepts 97% -> 94%,
    # 70 s of training); the README has the script's full-size numbers.
    result = script.run("purple", eval_prompts=32, batch_size=16, progress=False)
    print(result)
    assert result["new_concept"]["before"] <= 0.2
    assert result["new_concept"]["after"] >= 0.8
    assert result["old_concepts"]["after"] >= 0.85
