"""Checkpoints -> sdjax parameter trees and back: diffusers folders, hub repos, per-component state dicts.

Files are read by ``sdjax.layouts.files``; state-dict keys become Flax paths by ``sdjax.layouts.diffusers``,
checked against each module's parameter shapes (``param_shapes``): every tensor is used exactly once and
every parameter filled, or a ``WeightsMismatchError`` names what does not fit. Single files in the LDM
layout come through ``sdjax.single_file``, which converts them to the per-component state dicts used here.
"""

from __future__ import annotations

import importlib
import json
from functools import partial
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sdjax.config import CLIPTextConfig, ModelConfig, SchedulerConfig, UNetConfig, VAEConfig
from sdjax.layouts.diffusers import (
    TEXT_ENCODER_BUFFERS,
    TEXT_MODEL_PREFIX,
    WeightsMismatchError,  # noqa: F401  (public here: callers catch weights.WeightsMismatchError)
    flax_to_torch,
    strip_text_model_prefix,
    torch_to_flax,
)
from sdjax.layouts.files import (
    CheckpointError,  # noqa: F401  (public here: callers catch weights.CheckpointError)
    read_checkpoint_file,
    write_safetensors,
)
from sdjax.models.clip import PROJECTION_HEAD, CLIPTextModel
from sdjax.models.unet import UNet2DConditionModel
from sdjax.models.vae import AutoencoderKL

# File stems diffusers (models) and transformers (text encoders) write, in order of preference.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# The subfolders of a diffusers-layout Stable Diffusion folder.
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# The text encoders a folder may hold, each with its tokenizer: SD 1.x/2.x the first, SDXL base both, the SDXL
# refiner only the second (OpenCLIP bigG with its projection).
TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


# --- files and folders ------------------------------------------------------------------------------------


def _variant_name(filename: str, variant: Optional[str]) -> str:
    if not variant:
        return filename
    stem, ext = filename.split(".", 1)
    return f"{stem}.{variant}.{ext}"


def find_weights(folder: Path, variant: Optional[str] = None) -> list[Path]:
    """The weight files of one component folder, preferring safetensors, then sharded, then pickles."""
    candidates = []
    for stem in WEIGHT_STEMS:
        for ext in ("safetensors", "bin"):
            candidates.append((folder / _variant_name(f"{stem}.{ext}", variant), None))
            index = folder / f"{stem}.{ext}.index.json"
            if variant:
                index = folder / f"{stem}.{ext}.index.{variant}.json"
            candidates.append((None, index))
    # all safetensors options before any pickle
    candidates.sort(key=lambda c: ".bin" in str(c[0] or c[1]))
    for single, index in candidates:
        if single is not None and single.is_file():
            return [single]
        if index is not None and index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = f" with variant {variant!r}" if variant else ""
    raise FileNotFoundError(
        f"no weights{wanted} in {folder}; expected one of "
        f"{', '.join(_variant_name(f'{s}.safetensors', variant) for s in WEIGHT_STEMS)} "
        f"(or a sharded *.safetensors.index.json, or .bin); found: {present or 'nothing'}"
    )


def read_component(folder: Path, variant: Optional[str] = None) -> dict[str, np.ndarray]:
    """All tensors of one component folder (``unet/``, ``vae/``, ``text_encoder/``)."""
    state: dict[str, np.ndarray] = {}
    for file in find_weights(folder, variant):
        state.update(read_checkpoint_file(file))
    return state


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    variant: Optional[str] = None,
) -> Path:
    """A local diffusers-layout folder, downloading a hub repo id when the path does not exist.

    A hub id resolves to its snapshot in the local Hugging Face cache when that copy is complete (so it
    works offline; ``revision`` pins another one), else it is downloaded; with no network or
    ``HF_HUB_OFFLINE=1`` and no complete cached copy, ``HubUnreachableError`` (a ``FileNotFoundError``)
    says so at once. A single-file checkpoint path is refused here: route it with
    ``sdjax.single_file.is_single_file`` to ``from_single_file``. Hub downloads skip ``.bin``/``.ckpt`` pickles and other frameworks' weights whenever the repo has
    safetensors, and skip variants that were not asked for.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{path} is a file; from_pretrained takes a diffusers-layout folder or a hub repo id "
                "(use StableDiffusion.from_single_file for single-file checkpoints)"
            )
        return path
    text = str(path_or_repo_id)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise FileNotFoundError(f"model folder not found: {text} (and it is not a hub repo id like 'org/name')")
    return _download(text, revision=revision, token=token, variant=variant)


class HubUnreachableError(FileNotFoundError):
    """A hub repo id was given, the Hugging Face Hub cannot be reached (no network, or ``HF_HUB_OFFLINE=1``)
    and the model is not complete in the local Hugging Face cache."""


# Seconds to wait for the hub's first answer before calling it unreachable (``HF_HUB_ETAG_TIMEOUT`` overrides).
HUB_PROBE_TIMEOUT = 5.0


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read from the environment at call time."""
    for variable, tail in (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub")):
        value = os.environ.get(variable)
        if value:
            return Path(os.path.expandvars(value)).expanduser() / tail
    return Path(constants.HF_HUB_CACHE)


def _network_errors() -> tuple:
    """Exceptions that mean "no answer from the hub": OSError (requests' errors are OSErrors) and the transport
    errors of the httpx flavour the installed huggingface_hub uses."""
    errors: list = [OSError, OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _incomplete(folder: Path, variant: Optional[str]) -> list[str]:
    """What a diffusers-layout folder lacks to load (empty when complete)."""
    missing = [name for name in ("model_index.json", "scheduler/scheduler_config.json") if not (folder / name).is_file()]
    try:
        encoders = text_encoder_names(folder)
    except ValueError:
        encoders = ("text_encoder",)
    missing += [f"{c}/" for c in pipeline_subfolders(encoders) if not (folder / c).is_dir()]
    for component in (*encoders, "unet", "vae"):
        try:
            find_weights(folder / component, variant)
        except FileNotFoundError:
            missing.append(f"{component} weights")
    return missing


def _unreachable(repo_id: str, cache: Path, reason: str, missing: list[str]) -> HubUnreachableError:
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    cached = (f"the copy in the local Hugging Face cache ({folder}) is incomplete (missing {', '.join(missing)})"
              if missing else f"it is not in the local Hugging Face cache (checked {folder})")
    return HubUnreachableError(
        f"cannot load {repo_id!r}: the Hugging Face Hub cannot be reached ({reason}) and {cached}. To work "
        f"offline, download the model once while online (it is then cached in {cache}; set HF_HUB_OFFLINE=1 to "
        f"use the cache without trying the network; HF_HOME or HF_HUB_CACHE choose the cache folder), or pass "
        f"the path of a local diffusers-layout folder instead of a hub id."
    )


def hub_snapshot(
    repo_id: str,
    *,
    revision: Optional[str],
    token: Optional[str],
    lacks: Callable[[Path], list[str]],
    patterns: Callable[[list[str]], tuple[list[str], list[str]]],
) -> Path:
    """The snapshot folder of a hub repo: the local cache's copy when ``lacks(folder)`` finds nothing missing,
    else downloaded with ``patterns(repo files) -> (allow, ignore)``.

    Without network (or with ``HF_HUB_OFFLINE=1``) and no complete cached copy, raises ``HubUnreachableError``
    after one short request instead of huggingface_hub's retry loop.
    """
    cache = hub_cache_dir()
    missing: list[str] = []
    try:
        cached = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
        missing = lacks(cached)
        if not missing:
            return cached
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if _hub_offline():
        raise _unreachable(repo_id, cache, "HF_HUB_OFFLINE=1 is set", missing)
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT)
    try:  # one request, no retries: model_info lists the repo's files
        info = HfApi().model_info(repo_id, revision=revision, token=token, timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"hub repo {repo_id!r} not found, private or gated ({type(e).__name__}); check the id, pass token= "
            "for a private or gated repo, or give a local path"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"hub repo {repo_id!r} has no revision {revision!r}") from None
    except _network_errors() as e:  # no network, DNS failure, timeout, refused connection
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
        raise _unreachable(repo_id, cache, reason, missing) from None
    allow, ignore = patterns([s.rfilename for s in info.siblings or ()])
    return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache, allow_patterns=allow,
                                  ignore_patterns=ignore, etag_timeout=timeout))


def _model_patterns(variant: Optional[str], files: list[str]) -> tuple[list[str], list[str]]:
    weight_ext = "safetensors" if any(f.endswith(".safetensors") for f in files) else "bin"
    allow = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt"]
    for component in (*TEXT_ENCODERS, "unet", "vae"):
        allow.append(f"{component}/*.{variant}*.{weight_ext}" if variant else f"{component}/*.{weight_ext}")
    return allow, [] if variant else ["*.fp16.*", "*.ema.*", "*.non_ema.*"]


def _download(repo_id: str, *, revision, token, variant) -> Path:
    """A whole diffusers pipeline repo's snapshot folder (``hub_snapshot``)."""
    return hub_snapshot(repo_id, revision=revision, token=token, lacks=partial(_incomplete, variant=variant),
                        patterns=partial(_model_patterns, variant))


def _component_lacks(folder: Path, variant: Optional[str]) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    try:
        find_weights(folder, variant)
    except FileNotFoundError:
        missing.append("weights")
    return missing


def _component_patterns(variant: Optional[str], files: list[str]) -> tuple[list[str], list[str]]:
    stem = "diffusion_pytorch_model"
    ext = "safetensors" if any(f.startswith(stem) and f.endswith(".safetensors") for f in files) else "bin"
    single = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
    return ["config.json", single, f"{stem}.{ext}.index*.json", f"{stem}*-of-*.{ext}"], []


def component_snapshot(repo_id: str, *, what: str, revision: Optional[str] = None, token: Optional[str] = None,
                       variant: Optional[str] = None) -> Path:
    """The snapshot folder of a one-model diffusers repo (a ControlNet, a T2I-Adapter: ``config.json`` and
    ``diffusion_pytorch_model`` weights at its root), cached or downloaded as ``hub_snapshot``."""
    folder = hub_snapshot(repo_id, revision=revision, token=token, lacks=partial(_component_lacks, variant=variant),
                          patterns=partial(_component_patterns, variant))
    missing = _component_lacks(folder, variant)
    if missing:
        raise FileNotFoundError(f"hub repo {repo_id!r} is not a diffusers {what} (it lacks {', '.join(missing)} "
                                "at its root)")
    return folder


def _model_index(folder: Path) -> dict:
    file = folder / "model_index.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def text_encoder_names(folder: Path) -> tuple[str, ...]:
    """The text encoders of a diffusers-layout folder (``TEXT_ENCODERS`` keys), as its model_index.json names
    them (an entry ``[null, null]`` is an absent component); without a model_index.json, the subfolders present
    (``text_encoder`` at least). An SDXL pipeline class without ``text_encoder_2`` is a ``ValueError``."""
    index = _model_index(folder)
    names = []
    for name in TEXT_ENCODERS:
        entry = index.get(name)
        declared = isinstance(entry, (list, tuple)) and bool(entry) and entry[0] is not None
        if declared or (entry is None and ((folder / name).is_dir() or name == "text_encoder")):
            names.append(name)
    pipeline_class = str(index.get("_class_name", ""))
    if pipeline_class.startswith("StableDiffusionXL") and "text_encoder_2" not in names:
        raise ValueError(f"{folder}/model_index.json describes a {pipeline_class} without text_encoder_2; an SDXL "
                         "folder needs text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/")
    if not names:
        raise ValueError(f"{folder}/model_index.json names no text encoder (text_encoder or text_encoder_2)")
    return tuple(names)


def pipeline_subfolders(encoders: tuple[str, ...]) -> tuple[str, ...]:
    """The subfolders a diffusers-layout folder with text encoders ``encoders`` must have."""
    return (*(n for e in encoders for n in (e, TEXT_ENCODERS[e])), "unet", "vae", "scheduler")


def read_model_config(folder: Path) -> ModelConfig:
    """The ``ModelConfig`` of a diffusers-layout folder, from its config.json files and model_index.json (an
    SDXL folder: ``text_encoder_2/`` named there)."""
    encoders = text_encoder_names(folder)
    expected = pipeline_subfolders(encoders)
    missing = [c for c in expected if not (folder / c).is_dir()]
    if missing:
        kind = "an SDXL" if "text_encoder_2" in encoders else "a"
        raise FileNotFoundError(
            f"{folder} is not {kind} diffusers-layout Stable Diffusion folder: missing subfolder(s) "
            f"{', '.join(m + '/' for m in missing)}; expected {', '.join(c + '/' for c in expected)}"
        )
    index = _model_index(folder)
    text = {name: CLIPTextConfig.from_diffusers_config(folder / name / "config.json") for name in encoders}
    sdxl = {}
    if "text_encoder_2" in encoders:
        sdxl = dict(force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                    requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
        if not text["text_encoder_2"].has_projection:
            raise ValueError(f"{folder / 'text_encoder_2' / 'config.json'} is not a CLIPTextModelWithProjection; "
                             "SDXL's second text encoder needs its projection (pooled text embeds)")
    return ModelConfig(
        text_encoder=text.get("text_encoder"),
        unet=UNetConfig.from_diffusers_config(folder / "unet" / "config.json"),
        vae=VAEConfig.from_diffusers_config(folder / "vae" / "config.json"),
        scheduler=SchedulerConfig.from_diffusers_config(folder / "scheduler" / "scheduler_config.json"),
        text_encoder_2=text.get("text_encoder_2"),
        **sdxl,
    )


# --- parameter shapes -------------------------------------------------------------------------------------


def _unet_inputs(config: UNetConfig) -> tuple:
    side = 2 ** (len(config.block_out_channels) - 1)
    return (
        jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32),
    )


def _vae_inputs(config: VAEConfig) -> tuple:
    side = config.downsample_factor
    return (jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),)


def _text_encoder_inputs(config: CLIPTextConfig) -> tuple:
    return (jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32),)


# The smallest inputs each model initialises from, built from its config.
_EXAMPLE_INPUTS = {
    UNet2DConditionModel: _unet_inputs,
    AutoencoderKL: _vae_inputs,
    CLIPTextModel: _text_encoder_inputs,
}


def param_shapes(module: nn.Module) -> dict:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of a module's parameters, from ``jax.eval_shape``:
    nothing is allocated."""
    inputs = _EXAMPLE_INPUTS.get(type(module))
    if inputs is None:
        known = ", ".join(m.__name__ for m in _EXAMPLE_INPUTS)
        raise TypeError(f"param_shapes knows no inputs for a {type(module).__name__}; it knows {known}")
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs(module.config))["params"]


# --- state dicts <-> parameter trees ----------------------------------------------------------------------


def text_encoder_params_from_state_dict(
    state_dict: Mapping[str, Any], config: CLIPTextConfig, dtype: Any = None
) -> dict:
    """A transformers ``CLIPTextModel`` state dict (keys with or without ``text_model.``) -> Flax params;
    with ``config.projection_dim`` set, a ``CLIPTextModelWithProjection`` one (``text_projection.weight`` too).

    The non-persistent ``embeddings.position_ids`` buffer, which older checkpoints contain, is ignored.
    """
    return torch_to_flax(
        strip_text_model_prefix(state_dict),
        param_shapes(CLIPTextModel(config)),
        what="text encoder checkpoint",
        ignore=TEXT_ENCODER_BUFFERS,
        dtype=dtype,
    )


def text_encoder_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> transformers state dict with ``text_model.`` keys (loads in transformers 4 and 5); the
    projection head of a ``CLIPTextModelWithProjection`` stays beside ``text_model``, as ``text_projection.weight``."""
    return {
        key if key.startswith(PROJECTION_HEAD + ".") else TEXT_MODEL_PREFIX + key: value
        for key, value in flax_to_torch(params).items()
    }


def params_from_state_dicts(config: ModelConfig, states: Mapping, dtype, *, source: str = "checkpoint") -> dict:
    """Per-component PyTorch state dicts -> the sdjax parameter tree (device arrays of ``dtype``)."""
    kwargs = dict(dtype=dtype, param_dtype=dtype)
    unet = param_shapes(UNet2DConditionModel(config=config.unet, **kwargs))
    vae = param_shapes(AutoencoderKL(config=config.vae, **kwargs))
    text = {name: getattr(config, name) for name in TEXT_ENCODERS if getattr(config, name) is not None}
    params = {name: text_encoder_params_from_state_dict(states[name], text_config, dtype=dtype)
              for name, text_config in text.items()}
    params["unet"] = torch_to_flax(states["unet"], unet, what=f"{source} unet", dtype=dtype)
    params["vae"] = torch_to_flax(states["vae"], vae, what=f"{source} vae", dtype=dtype)
    return jax.tree.map(jnp.asarray, params)


def load_pretrained(folder: Path, *, dtype, variant: Optional[str] = None) -> tuple[ModelConfig, dict]:
    """A diffusers-layout folder -> (ModelConfig, params)."""
    config = read_model_config(folder)
    names = (*(n for n in TEXT_ENCODERS if getattr(config, n) is not None), "unet", "vae")
    states = {name: read_component(folder / name, variant) for name in names}
    return config, params_from_state_dicts(config, states, dtype, source=str(folder))


def state_dicts_from_params(params: Mapping) -> dict:
    """The sdjax parameter tree -> per-component PyTorch-layout state dicts (numpy)."""
    params = jax.device_get(params)
    states = {name: text_encoder_state_dict(params[name]) for name in TEXT_ENCODERS if name in params}
    return {**states, "unet": flax_to_torch(params["unet"]), "vae": flax_to_torch(params["vae"])}


def _model_index_for(config: ModelConfig) -> dict:
    """model_index.json of diffusers' StableDiffusionPipeline, or for SDXL its StableDiffusionXLPipeline (the
    refiner, without the first text encoder: StableDiffusionXLImg2ImgPipeline)."""
    absent = [None, None]
    common = {
        "_diffusers_version": "0.30.0",
        "feature_extractor": absent,
        "scheduler": ["diffusers", config.scheduler.to_diffusers_config()["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not config.is_sdxl:
        return {"_class_name": "StableDiffusionPipeline", **common, "requires_safety_checker": False,
                "safety_checker": absent, "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}
    has_first = config.text_encoder is not None
    index = {
        "_class_name": "StableDiffusionXLPipeline" if has_first else "StableDiffusionXLImg2ImgPipeline",
        **common,
        "force_zeros_for_empty_prompt": config.force_zeros_for_empty_prompt,
        "image_encoder": absent,
        "text_encoder": ["transformers", "CLIPTextModel"] if has_first else absent,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_first else absent,
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    if not has_first:  # only diffusers' SDXL image-to-image pipelines take this setting
        index["requires_aesthetics_score"] = config.requires_aesthetics_score
    return index


def save_pretrained(folder: Path, config, params: dict, tokenizer, tokenizer_2=None) -> None:
    """Write the diffusers layout that diffusers' PyTorch ``StableDiffusionPipeline.from_pretrained`` (SDXL:
    ``StableDiffusionXLPipeline``) loads. ``tokenizer``: the first text encoder's (None for the SDXL refiner),
    ``tokenizer_2``: SDXL's second."""
    folder = Path(folder)
    states = state_dicts_from_params(params)
    model_index = _model_index_for(config)
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    files = {
        name: ("model.safetensors", "config.json", getattr(config, name).to_diffusers_config())
        for name in TEXT_ENCODERS if getattr(config, name) is not None
    }
    files.update({
        "unet": ("diffusion_pytorch_model.safetensors", "config.json", config.unet.to_diffusers_config()),
        "vae": ("diffusion_pytorch_model.safetensors", "config.json", config.vae.to_diffusers_config()),
    })
    for name in files:
        if name in TEXT_ENCODERS and tokenizers[TEXT_ENCODERS[name]] is None:
            raise ValueError(f"save_pretrained: the model has a {name} but no {TEXT_ENCODERS[name]} was given")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    for name, (weights_file, config_file, config_json) in files.items():
        (folder / name).mkdir(exist_ok=True)
        write_safetensors(folder / name / weights_file, states[name])
        (folder / name / config_file).write_text(json.dumps(config_json, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config.scheduler.to_diffusers_config(), indent=2)
    )
    for encoder, tokenizer_name in TEXT_ENCODERS.items():
        if encoder in files:
            tokenizers[tokenizer_name].save_pretrained(str(folder / tokenizer_name))
