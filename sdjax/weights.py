"""Reading and writing checkpoint files: safetensors (plain, sharded, variants), guarded pickle, hub repos.

Everything here returns or takes flat ``{key: numpy array}`` state dicts in the PyTorch layout;
``sdjax.convert`` turns them into Flax trees. torch is never imported unless a ``.bin`` / ``.ckpt``
pickle must be read, and then only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from sdjax.convert import WeightsMismatchError  # noqa: F401  (raised by the loaders here)

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

# File stems diffusers (models) and transformers (text encoders) write, in order of preference.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: corrupt, truncated or unsafe."""


def read_safetensors(path: os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into numpy arrays (bf16 included), memory-mapped.

    The header is validated against the file size, so a truncated download is reported as such
    instead of surfacing later as garbage weights.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: header claims {header_len} bytes "
                f"but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + data_len > size:
        raise CheckpointError(
            f"{path} is truncated: tensors need {data_start + data_len} bytes, the file has {size}"
        )
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    out = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[key] = buffer[data_start + begin : data_start + end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(path: os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write numpy arrays (bf16 included) as a safetensors file that PyTorch tools read."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[key]))
        name = _DTYPE_NAMES.get(array.dtype)
        if name is None:
            raise ValueError(f"cannot write tensor {key} of dtype {array.dtype} to safetensors")
        header[key] = {"dtype": name, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename: arrays memory-mapped from the old file (read_safetensors) stay valid.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)


def read_torch_pickle(path: os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``.bin`` / ``.ckpt`` pickle through ``torch.load(weights_only=True)``: never runs code from the file."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it safely needs torch (torch.load with weights_only=True), "
            "which is not installed. Convert it to .safetensors, or `pip install torch`."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others for disallowed globals or bad files
        raise CheckpointError(
            f"{path} could not be loaded safely (torch.load weights_only=True refused or failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it may hold more than tensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:
                out[key] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[key] = value.numpy()
    return out


def read_checkpoint_file(path: os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".ckpt", ".pt", ".pth"):
        return read_torch_pickle(path)
    raise CheckpointError(f"unknown checkpoint file type {path.name}; accepted: .safetensors, .bin, .ckpt, .pt, .pth")


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


COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


def resolve_model_dir(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    variant: Optional[str] = None,
) -> Path:
    """A local diffusers-layout folder, downloading a hub repo id when the path does not exist.

    Hub downloads skip ``.bin``/``.ckpt`` pickles and other frameworks' weights whenever the repo has
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


def _download(repo_id: str, *, revision, token, variant) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id, revision=revision, token=token)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt"]
    weight_ext = "safetensors" if has_safetensors else "bin"
    for component in ("text_encoder", "unet", "vae"):
        if variant:
            patterns.append(f"{component}/*.{variant}*.{weight_ext}")
        else:
            patterns.append(f"{component}/*.{weight_ext}")
    ignore = [] if variant else ["*.fp16.*", "*.ema.*", "*.non_ema.*"]
    return Path(
        snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns, ignore_patterns=ignore)
    )


# --- diffusers-layout model folders -> configs and parameter trees, and back -------------------------------


def _text_encoder_module(config, dtype):
    from sdjax.models.clip import CLIPTextModel

    return CLIPTextModel(config=config, dtype=dtype, param_dtype=dtype)


def parameter_template(module, component: str, config) -> dict:
    """Shapes and dtypes of a module's parameters, from ``jax.eval_shape`` (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    if component == "unet":
        side = 2 ** (len(config.block_out_channels) - 1)
        args = (
            jnp.zeros((1, side, side, config.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, 1, config.cross_attention_dim)),
        )
    elif component == "vae":
        side = config.downsample_factor
        args = (jnp.zeros((1, side, side, config.in_channels)),)
    elif component == "text_encoder":
        args = (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)
    else:
        raise ValueError(f"unknown component {component!r}")
    return jax.eval_shape(lambda: module.init(key, *args))["params"]


def _modules(config, dtype):
    from sdjax.models.clip import CLIPTextModel
    from sdjax.models.unet import UNet2DConditionModel
    from sdjax.models.vae import AutoencoderKL

    kwargs = dict(dtype=dtype, param_dtype=dtype)
    return {
        "text_encoder": CLIPTextModel(config=config.text_encoder, **kwargs),
        "unet": UNet2DConditionModel(config=config.unet, **kwargs),
        "vae": AutoencoderKL(config=config.vae, **kwargs),
    }


def read_model_config(folder: Path):
    """The ``ModelConfig`` of a diffusers-layout folder, from its config.json files."""
    from sdjax.config import CLIPTextConfig, ModelConfig, SchedulerConfig, UNetConfig, VAEConfig

    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a diffusers-layout Stable Diffusion folder: missing subfolder(s) "
            f"{', '.join(m + '/' for m in missing)}; expected {', '.join(c + '/' for c in COMPONENTS)}"
        )
    return ModelConfig(
        text_encoder=CLIPTextConfig.from_diffusers_config(folder / "text_encoder" / "config.json"),
        unet=UNetConfig.from_diffusers_config(folder / "unet" / "config.json"),
        vae=VAEConfig.from_diffusers_config(folder / "vae" / "config.json"),
        scheduler=SchedulerConfig.from_diffusers_config(folder / "scheduler" / "scheduler_config.json"),
    )


def params_from_state_dicts(config, states: dict, dtype, *, source: str = "checkpoint") -> dict:
    """Per-component PyTorch state dicts -> the sdjax parameter tree (device arrays of ``dtype``)."""
    import jax
    import jax.numpy as jnp

    from sdjax.convert import torch_to_flax
    from sdjax.models.clip import text_encoder_params_from_state_dict

    modules = _modules(config, dtype)
    params = {
        "text_encoder": text_encoder_params_from_state_dict(states["text_encoder"], config.text_encoder, dtype=dtype),
        "unet": torch_to_flax(
            states["unet"], parameter_template(modules["unet"], "unet", config.unet), what=f"{source} unet", dtype=dtype
        ),
        "vae": torch_to_flax(
            states["vae"], parameter_template(modules["vae"], "vae", config.vae), what=f"{source} vae", dtype=dtype
        ),
    }
    return jax.tree.map(jnp.asarray, params)


def load_pretrained(folder: Path, *, dtype, variant: Optional[str] = None):
    """A diffusers-layout folder -> (ModelConfig, params)."""
    config = read_model_config(folder)
    states = {name: read_component(folder / name, variant) for name in ("text_encoder", "unet", "vae")}
    return config, params_from_state_dicts(config, states, dtype, source=str(folder))


def state_dicts_from_params(params: dict) -> dict:
    """The sdjax parameter tree -> per-component PyTorch-layout state dicts (numpy)."""
    import jax

    from sdjax.convert import flax_to_torch
    from sdjax.models.clip import text_encoder_state_dict

    params = jax.device_get(params)
    return {
        "text_encoder": text_encoder_state_dict(params["text_encoder"]),
        "unet": flax_to_torch(params["unet"]),
        "vae": flax_to_torch(params["vae"]),
    }


def save_pretrained(folder: Path, config, params: dict, tokenizer) -> None:
    """Write the diffusers layout that diffusers' PyTorch ``StableDiffusionPipeline.from_pretrained`` loads."""
    folder = Path(folder)
    states = state_dicts_from_params(params)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    files = {
        "text_encoder": ("model.safetensors", "config.json", config.text_encoder.to_diffusers_config()),
        "unet": ("diffusion_pytorch_model.safetensors", "config.json", config.unet.to_diffusers_config()),
        "vae": ("diffusion_pytorch_model.safetensors", "config.json", config.vae.to_diffusers_config()),
    }
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
    tokenizer.save_pretrained(str(folder / "tokenizer"))
