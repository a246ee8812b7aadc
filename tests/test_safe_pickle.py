"""PyTorch pickles read without torch and without running code: sdjax.layouts.safe_pickle via read_torch_pickle.

Checkpoints are written with the real ``torch.save``; sdjax must read the same tensors (bit-identical) with
torch made unimportable, never import the modules a pickle names, and never run a pickled payload.
"""

import os
import pickle
import subprocess
import sys
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from sdjax.layouts import files, safe_pickle

# --- a PyTorch Lightning-style checkpoint --------------------------------------------------------------------

_CALLBACK_MODULE = '''
import pathlib
pathlib.Path({canary!r}).touch()  # importing this module at load time would leave this file behind


class ModelCheckpoint:
    def __init__(self):
        self.monitor = "val/loss_simple_ema"
        self.best_model_score = None
        self.save_top_k = 3
'''


def _tensors():
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    shared = torch.arange(40, dtype=torch.float16)
    return {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5, 2).half(),
        "bf16": torch.randn(4, 3).to(torch.bfloat16),
        "f64": torch.randn(3, dtype=torch.float64),
        "i64": torch.arange(-3, 3),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "view_t": base[1:, 2:].t(),  # non-contiguous, offset into a larger storage
        "view_step": base[::2, 1::3],
        "shared_a": shared[3:13].view(2, 5),  # two tensors of one storage
        "shared_b": shared[20:],
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "bf16_view": torch.randn(4, 6).to(torch.bfloat16)[:, 1:4],
    }


def _bits(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.view(np.uint8) if array.size else array


def _assert_same_tensors(ours: dict, expected: dict):
    assert ours.keys() == expected.keys()
    for key, tensor in expected.items():
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            reference = tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            reference = tensor.numpy()
        assert ours[key].dtype == reference.dtype, key
        assert ours[key].shape == reference.shape, key
        assert np.array_equal(_bits(ours[key]), _bits(reference)), key


@pytest.fixture
def lightning_checkpoint(tmp_path, monkeypatch):
    """(path, the tensors torch.load gives back, callback module name, import canary)."""
    name = f"fake_lightning_callbacks_{os.getpid()}_{time.monotonic_ns()}"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    canary = tmp_path / "callback_module_imported"
    (module_dir / f"{name}.py").write_text(_CALLBACK_MODULE.format(canary=str(canary)))
    monkeypatch.syspath_prepend(str(module_dir))
    module = __import__(name)
    canary.unlink()
    state_dict = _tensors()
    checkpoint = {
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {module.ModelCheckpoint: module.ModelCheckpoint()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": np.float64(1e-4)}]}],
        "lr_schedulers": [],
        "numpy_array": np.arange(6, dtype=np.float32).reshape(2, 3),
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(checkpoint, path)
    expected = torch.load(path, weights_only=False)["state_dict"]  # the module is importable here
    del sys.modules[name]
    return path, expected, name, canary


def test_lightning_checkpoint_loads_without_torch_or_its_modules(lightning_checkpoint, monkeypatch):
    path, expected, module_name, canary = lightning_checkpoint
    monkeypatch.setitem(sys.modules, "torch", None)  # reading needs no torch at all
    state = files.read_torch_pickle(path)
    _assert_same_tensors(state, expected)
    everything = safe_pickle.load_torch_file(path)
    assert module_name not in sys.modules and not canary.exists()  # the callback's module was never imported
    assert type(everything["global_step"]) is np.int64 and everything["global_step"] == 470000
    (callback_class, callback), = everything["callbacks"].items()
    assert safe_pickle.is_placeholder(callback) and safe_pickle.is_placeholder(callback_class)
    assert safe_pickle.placeholder_name(callback) == f"{module_name}.ModelCheckpoint"
    assert callback.state["monitor"] == "val/loss_simple_ema"
    assert np.array_equal(everything["optimizer_states"][0]["state"][0]["exp_avg"], np.ones(3, np.float32))
    assert everything["optimizer_states"][0]["param_groups"][0]["lr"] == np.float64(1e-4)
    assert np.array_equal(everything["numpy_array"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_legacy_format_and_plain_state_dicts_load(tmp_path, monkeypatch):
    tensors = _tensors()
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": tensors, "global_step": 5}, legacy, _use_new_zipfile_serialization=False)
    plain = tmp_path / "pytorch_model.bin"
    torch.save(tensors, plain)
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not zipfile.is_zipfile(legacy)
    _assert_same_tensors(files.read_torch_pickle(legacy), tensors)
    _assert_same_tensors(files.read_torch_pickle(plain), tensors)
    _assert_same_tensors(files.read_checkpoint_file(plain), tensors)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": _tensors()}, full)
    data = full.read_bytes()
    for cut in (300, len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut{cut}.ckpt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(files.CheckpointError, match="could not be loaded safely"):
            files.read_torch_pickle(truncated)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"x": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.ckpt").write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(files.CheckpointError, match="truncated"):
        files.read_torch_pickle(tmp_path / "legacy_cut.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(files.CheckpointError, match="could not be loaded safely"):
        files.read_torch_pickle(text)


def test_out_of_bounds_tensor_views_are_refused():
    storage = np.arange(10, dtype=np.float32)
    assert np.array_equal(safe_pickle.rebuild_tensor(storage, 2, (2, 2), (4, 1)), [[2, 3], [6, 7]])
    for offset, size, stride in ((8, (3,), (1,)), (0, (2, 2), (10, 1)), (-1, (1,), (1,)), (0, (2,), (-1,))):
        with pytest.raises(safe_pickle.PickleError):
            safe_pickle.rebuild_tensor(storage, offset, size, stride)


# --- malicious pickles: refused or neutralised, never run ----------------------------------------------------


class _Callable:
    """A pickled callable built by its own __reduce__ (lets a payload chain getattr(__import__(...)))."""

    def __init__(self, reduce):
        self.reduce = reduce

    def __call__(self, *args):
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return self.reduce


class _Payload:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _payloads(canary):
    touch = f"touch {canary}"
    os_module = _Callable((__import__, ("os",)))
    return {
        "os.system": _Payload((os.system, (touch,))),
        "eval": _Payload((eval, (f"open({str(canary)!r}, 'w').close()",))),
        "builtins.exec": _Payload((exec, (f"import pathlib; pathlib.Path({str(canary)!r}).touch()",))),
        "subprocess.Popen": _Payload((subprocess.Popen, (["touch", str(canary)],))),
        "getattr(__import__('os'), 'system')": _Payload((_Callable((getattr, (os_module, "system"))), (touch,))),
    }


def _run_live(payload, canary):
    """Plain unpickling runs the payload: proof that each payload is real."""
    result = pickle.loads(pickle.dumps(payload, protocol=2))
    if isinstance(result, subprocess.Popen):
        result.wait()
    elif hasattr(result, "close"):
        result.close()
    assert canary.exists()
    canary.unlink()


@pytest.mark.parametrize("kind", list(_payloads("x")))
def test_malicious_pickles_never_run(tmp_path, kind):
    canary = tmp_path / "pwned"
    payload = _payloads(canary)[kind]
    weights = {"model.diffusion_model.out.2.weight": torch.ones(2)}
    placements = {
        "top level": payload,
        "in the state dict": {"state_dict": {**weights, "model.diffusion_model.out.2.bias": payload}},
        "beside the state dict": {"state_dict": weights, "callbacks": {"checkpoint": payload}},
    }
    for where, obj in placements.items():
        for legacy in (False, True):
            path = tmp_path / f"{where.replace(' ', '_')}{'_legacy' if legacy else ''}.ckpt"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            try:
                state = files.read_torch_pickle(path)
            except files.CheckpointError as e:
                assert where != "beside the state dict"
                assert "could not be loaded safely" in str(e) or "does not hold a state dict" in str(e)
            else:
                assert where == "beside the state dict"
                assert list(state) == list(weights)
            everything = safe_pickle.load_torch_file(path)  # the payload comes back as an inert placeholder
            time.sleep(0.05 if kind == "subprocess.Popen" else 0)
            assert not canary.exists(), (where, legacy)
    raw = tmp_path / "raw.pkl.ckpt"  # a plain pickle, not a torch.save file
    raw.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(files.CheckpointError, match="could not be loaded safely"):
        files.read_torch_pickle(raw)
    placeholder = safe_pickle.unpickle(pickle.dumps(payload, protocol=2))
    assert safe_pickle.is_placeholder(placeholder)
    assert safe_pickle.is_placeholder(placeholder("rm -rf /"))  # calling it only builds another placeholder
    assert safe_pickle.is_placeholder(everything) or isinstance(everything, dict)
    assert not canary.exists()
    _run_live(payload, canary)


def test_protocol_0_getattr_chain_is_inert(tmp_path):
    canary = tmp_path / "pwned"
    chain = (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch "
        + str(canary).encode()
        + b"\ntR."
    )
    result = safe_pickle.unpickle(chain)
    assert safe_pickle.is_placeholder(result) and not canary.exists()
    path = tmp_path / "chain.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", chain)
        archive.writestr("archive/version", "3\n")
    with pytest.raises(files.CheckpointError, match=r"does not hold a state dict \(found a builtins\.getattr"):
        files.read_torch_pickle(path)
    assert not canary.exists()
    pickle.loads(chain)
    assert canary.exists()


def test_placeholders_cannot_be_rewired():
    ref = safe_pickle.unpickle(pickle.dumps(_Payload((os.system, ("true",))), protocol=2))
    with pytest.raises(safe_pickle.PickleError):
        type(ref).__call__ = lambda *a: None
    with pytest.raises(safe_pickle.PickleError):
        ref.args = ()
    # BUILD with a slot state on an allowed function is refused rather than applied.
    build_on_function = b"ctorch._utils\n_rebuild_tensor_v2\n(N(dV_function\nI1\nstb."
    with pytest.raises(safe_pickle.PickleError):
        safe_pickle.unpickle(build_on_function)


def test_numpy_values_are_rebuilt_from_checked_state():
    values = {
        "scalars": [np.int64(-3), np.float32(0.5), np.bool_(True), np.float16(2.0), np.uint8(7)],
        "arrays": [np.arange(6, dtype=">i4").reshape(2, 3), np.asfortranarray(np.ones((2, 3))), np.array(1.5),
                   np.array(["a", "bc"]), np.array([{"k": 1}, None], dtype=object), np.zeros((0, 3), np.int8)],
        "dtype": np.dtype("float16"),
    }
    data = pickle.dumps(values, protocol=2)
    back, expected = safe_pickle.unpickle(data), pickle.loads(data)  # numpy itself restores native byte order
    for ours, theirs in zip(back["scalars"], expected["scalars"]):
        assert type(ours) is type(theirs) and ours == theirs
    for ours, theirs in zip(back["arrays"], expected["arrays"]):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert ours.tolist() == theirs.tolist()
    assert back["dtype"].resolve() == np.dtype("float16")
    structured = pickle.dumps(np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]), protocol=2)
    with pytest.raises(safe_pickle.PickleError, match="structured"):
        safe_pickle.unpickle(structured)
    honest = pickle.dumps(np.arange(4, dtype=np.int32), protocol=2)
    assert honest.count(b"K\x04\x85") == 1  # the shape (4,)
    with pytest.raises(safe_pickle.PickleError, match=r"shape \(8,\) .* data that does not fit"):
        safe_pickle.unpickle(honest.replace(b"K\x04\x85", b"K\x08\x85"))  # claims more than its data
