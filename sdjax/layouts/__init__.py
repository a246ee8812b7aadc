"""Checkpoint layouts as data: which key holds which tensor, in which memory layout, in which file.

* ``files``     reading and writing tensors: one safetensors header reader, guarded pickles
* ``diffusers`` diffusers / transformers state-dict keys <-> Flax parameter paths, layout transposes
* ``ldm``       the original CompVis / LDM (A1111) single-file layout: module tables, both directions
* ``lora_keys`` LoRA tensor names: diffusers / PEFT, older diffusers, kohya / A1111

Nothing here builds a model: code that needs a module's parameter shapes takes them as arguments
(``sdjax.weights.param_shapes`` computes them).
"""
