"""The adapters of a loaded model: LoRA (unfused with traced scales, or fused into the weights) and
textual-inversion embeddings, as methods of ``StableDiffusion`` (its ``params``, ``config``, ``tokenizer``,
``dtype`` and the adapter state its constructor sets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import inputs, lora, sdxl
from sdjax.generate import merge_loaded_lora
from sdjax.layouts.textual_inversion import read_embedding
from sdjax.prompt import Embedding, tokenize_pair


class AdapterMethods:
    """LoRA and textual-inversion methods of ``StableDiffusion`` (kept here so the pipeline module holds the
    generation API)."""

    # --- LoRA ----------------------------------------------------------------------------------------------

    def load_lora(self, path, scale: float = 1.0, name: Optional[str] = None, *, strict: bool = False) -> str:
        """Load a LoRA file (diffusers/PEFT or kohya/A1111, U-Net and/or text encoder) as an adapter.

        Adapters stay separate from the base weights and are merged inside the generate function with
        their scale as a traced value: ``set_lora_scale`` never recompiles. Returns the adapter's name
        (default: the file name without extension). Unknown tensors warn, or raise with ``strict``.
        """
        sdxl.refuse(self.config, "LoRA")
        adapter = lora.load_lora_file(path, self.config, strict=strict)
        return self.add_lora(adapter, scale, name or Path(lora.resolve_lora_file(path)).stem)

    def add_lora(self, adapter: dict, scale: float = 1.0, name: str = "default") -> str:
        """Add an in-memory adapter (``sdjax.lora`` layout) under ``name``, replacing one of that name."""
        sdxl.refuse(self.config, "LoRA")
        inputs.check_number(f"LoRA scale of {name!r}", scale, *inputs.LORA_SCALE_RANGE)  # before anything changes
        placed = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter)
        self.params = {**self.params, "lora": {**self.params.get("lora", {}), name: placed}}
        self.set_lora_scale(name, scale)
        return name

    @property
    def lora_adapters(self) -> dict[str, float]:
        """{name: scale} of the loaded, not fused, adapters."""
        return dict(self._lora_scales)

    def set_lora_scale(self, name: str, scale: float) -> None:
        if name not in self.params.get("lora", {}):
            raise ValueError(f"no LoRA adapter named {name!r}; loaded: {sorted(self._lora_scales) or 'none'}")
        self._lora_scales[name] = inputs.check_number(f"LoRA scale of {name!r}", scale, *inputs.LORA_SCALE_RANGE)

    def merged_params(self) -> dict:
        """The base parameters with the loaded adapters merged at their current scales."""
        return merge_loaded_lora(self.params, self._lora_scales_per_image(1))

    def fuse_lora(self) -> None:
        """Merge the loaded adapters into the base weights at their current scales (faster to run, no
        per-call merge); ``unload_lora`` restores the original weights exactly."""
        if "lora" not in self.params:
            return
        fused = self.merged_params()
        for adapter in self.params["lora"].values():
            for component, modules in adapter.items():
                for path in modules:
                    key = (component, *path.split("/"), "kernel")
                    if key not in self._unfused_kernels:
                        self._unfused_kernels[key] = _get_path(self.params, key)
        self.params = fused
        self._lora_scales = {}

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Remove the adapter ``name``, or with no name every adapter, loaded or fused: back to the base
        model's weights."""
        if name is not None:
            adapters = dict(self.params.get("lora", {}))
            if adapters.pop(name, None) is None:
                raise ValueError(f"no LoRA adapter named {name!r}; loaded: {sorted(self._lora_scales) or 'none'}")
            base = {k: v for k, v in self.params.items() if k != "lora"}
            self.params = {**base, "lora": adapters} if adapters else base
            del self._lora_scales[name]
            return
        params = {k: v for k, v in self.params.items() if k != "lora"}
        for key, kernel in self._unfused_kernels.items():
            params = _set_path(params, key, kernel)
        self.params = params
        self._lora_scales = {}
        self._unfused_kernels = {}

    # --- textual inversion ----------------------------------------------------------------------------------

    def load_embedding(self, path, token: Optional[str] = None) -> str:
        """Load a textual-inversion embedding (A1111 ``.pt`` / ``.safetensors``, diffusers
        ``learned_embeds.safetensors`` / ``.bin``, SDXL ``clip_l``; ``sdjax.layouts.textual_inversion``) under
        ``token`` (default: the file name without extension, as A1111 names it); returns the token.

        Its vectors become new rows of the token embedding table past the vocabulary, and the token, written
        anywhere in a prompt (weighted or not), stands for them (n vectors: n token ids). Loading another
        token grows the table, so the next generation compiles once. A token of that name already loaded is
        replaced. ``ValueError`` for vectors of another text encoder's width or a token that is already one
        word of the tokenizer's vocabulary."""
        vectors, _ = read_embedding(path, self.config.text_encoder.hidden_size)
        return self.add_embedding(vectors, Path(path).stem if token is None else token)

    def add_embedding(self, vectors, token: str) -> str:
        """``load_embedding`` for vectors in memory: (n, width) or (width,) numbers under ``token``."""
        sdxl.refuse(self.config, "textual inversion")
        width = self.config.text_encoder.hidden_size
        vectors = np.asarray(vectors, np.float32)
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or vectors.shape[1] != width or not len(vectors):
            raise ValueError(f"embedding vectors must be (vectors, {width}) for this text encoder, got {vectors.shape}")
        if not np.all(np.isfinite(vectors)):
            raise ValueError(f"embedding {token!r} holds NaN or infinite values")
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise ValueError(f"embedding token must be a non-empty string without surrounding spaces, got {token!r}")
        name_ids = tuple(self.tokenizer(token, add_special_tokens=False, verbose=False)["input_ids"])
        if len(name_ids) == 1:
            raise ValueError(f"embedding token {token!r} is already a word of the tokenizer's vocabulary (id "
                             f"{name_ids[0]}), so prompts using that word would change; choose another token "
                             "(load_embedding(path, token='<my-token>'))")
        entries = {**self._embeddings, token: Embedding(token, vectors, 0, name_ids)}
        self._set_embeddings(entries)
        return token

    def unload_embedding(self, token: Optional[str] = None) -> None:
        """Forget the embedding ``token``, or with no token every loaded embedding."""
        if token is not None and token not in self._embeddings:
            raise ValueError(f"no embedding named {token!r}; loaded: {sorted(self._embeddings) or 'none'}")
        self._set_embeddings({} if token is None else {k: v for k, v in self._embeddings.items() if k != token})

    @property
    def embeddings(self) -> dict[str, int]:
        """{token: number of vectors} of the loaded textual-inversion embeddings."""
        return {name: len(e.vectors) for name, e in self._embeddings.items()}

    def _set_embeddings(self, entries: dict) -> None:
        first, placed = self.config.text_encoder.vocab_size, {}
        for name, entry in entries.items():
            placed[name] = dataclasses.replace(entry, first_id=first)
            first += len(entry.vectors)
        params = {k: v for k, v in self.params.items() if k != "embeddings"}
        if placed:
            table = np.concatenate([e.vectors for e in placed.values()])
            params["embeddings"] = jnp.asarray(table, self.dtype)
        self.params, self._embeddings = params, placed

    def tokenize_prompts(self, prompts: Sequence[str], negatives: Sequence[str], syntax: str = "a1111"):
        """Ids and weights (``sdjax.prompt.TokenizedPrompts``) of prompts and negative prompts, both padded to
        the same number of 77-token chunks (its bucket, ``sdjax.prompt.chunk_bucket``) and of compel's
        variants (``sdjax.prompt.tokenize_pair``)."""
        return tokenize_pair(self.tokenizer, list(prompts), list(negatives), syntax, list(self._embeddings.values()))

    def _lora_scales_per_image(self, count: int) -> Optional[dict]:
        if "lora" not in self.params:
            return None
        return {name: np.full((count,), scale, np.float32) for name, scale in self._lora_scales.items()}


def _get_path(tree, key: tuple):
    return tree if not key else _get_path(tree[key[0]], key[1:])


def _set_path(tree: dict, key: tuple, value) -> dict:
    """A copy of nested dict ``tree`` with ``value`` at ``key`` (only the dicts along the path are copied)."""
    if len(key) == 1:
        return {**tree, key[0]: value}
    return {**tree, key[0]: _set_path(tree[key[0]], key[1:], value)}
