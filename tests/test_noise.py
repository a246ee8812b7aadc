"""sdjax.noise: torch-compatible noise drawn with numpy.

``torch-cpu`` is checked bit for bit against the installed torch; ``torch-cuda`` (Philox4x32-10,
as A1111's "NV" source) against Random123's known-answer vectors and A1111's documented output.
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdjax import noise

SEEDS = (0, 1, 42, 2**32 + 5, 2**63 + 7)
SHAPES = ((1,), (7,), (15,), (16,), (17,), (4, 64, 64), (2, 4, 8, 8), (3, 5, 7))


def _torch(vector_kernel: bool = True):
    """Import torch; draws of >= 16 elements need the x86 AVX2/AVX512 kernel sdjax emulates."""
    torch = pytest.importorskip("torch")
    if vector_kernel and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch's CPU normal kernel here is not the x86 AVX2/AVX512 one sdjax reproduces")
    return torch


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and float32 bit patterns (np.array_equal, and signed zeros too)."""
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a, b) \
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# torch-cpu: mt19937 + ATen's CPU normal sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_cpu_matches_torch_randn(seed):
    torch = _torch()
    for shape in SHAPES:
        torch.manual_seed(seed)
        want = torch.randn(shape).numpy()
        assert _same_bits(noise.torch_randn("torch-cpu", seed, shape), want), (seed, shape)


def test_torch_cpu_scalar_path_needs_no_vector_kernel():
    torch = _torch(vector_kernel=False)  # < 16 elements: at::normal_distribution<double>, libm
    for seed in SEEDS:
        for shape in ((1,), (2,), (7,), (15,), (3, 5), ()):
            want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
            assert _same_bits(noise.torch_randn("torch-cpu", seed, shape), want), (seed, shape)


def test_torch_cpu_stream_mixes_scalar_and_vector_draws():
    torch = _torch()
    # Odd scalar draws leave a cached Box-Muller value in the generator, which survives the
    # vectorised draws in between; partial chunks of 16 redraw 16 uniforms.
    shapes = [(1,), (4, 8, 8), (3,), (17,), (1,), (1,), (5,), (2, 4, 8, 8), (15,), (16,), (1,),
              (33,), (7,), (4, 64, 64), (1,), (0,), (2,), (1000,), (9,)]
    for seed in (0, 7, 2**63 + 7):
        g = torch.Generator().manual_seed(seed)
        ours = noise.torch_generator("torch-cpu", seed)
        for i, shape in enumerate(shapes):
            assert _same_bits(ours.randn(shape), torch.randn(shape, generator=g).numpy()), (seed, i)


def test_torch_cpu_batch_seeds_and_ancestral_steps():
    torch = _torch()
    seed, shape = 1234, (1, 4, 16, 16)  # A1111: image i uses seed + i, then keeps drawing
    for i in range(3):
        g = torch.Generator().manual_seed(seed + i)
        ours = noise.TorchCPUGenerator(seed + i)
        for _ in range(4):
            assert _same_bits(ours.randn(shape), torch.randn(shape, generator=g).numpy())


def test_torch_cpu_uses_low_32_bits_of_the_seed():
    a = noise.torch_randn("torch-cpu", 5, (4, 16))
    assert _same_bits(noise.torch_randn("torch-cpu", 2**32 + 5, (4, 16)), a)


# ---------------------------------------------------------------------------------------------
# torch-cuda: Philox4x32-10 as A1111's "NV" source
# ---------------------------------------------------------------------------------------------

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter (4 words), key (2), expected (4).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox4x32_10_known_answers():
    counter = np.array([c for c, _, _ in PHILOX_KAT], np.uint32).T
    key = np.array([k for _, k, _ in PHILOX_KAT], np.uint32).T
    want = np.array([w for _, _, w in PHILOX_KAT], np.uint32).T
    np.testing.assert_array_equal(noise.philox4x32_10(counter, key), want)


def test_torch_cuda_matches_a1111_documented_output():
    # modules/rng_philox.py's docstring: Generator(seed=0).randn(shape=(3, 4)), 8 decimals.
    want = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                     [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                     [-1.07454231, -0.36314407, -1.67105067, 2.26550497]], np.float32)
    got = noise.torch_randn("torch-cuda", 0, (3, 4))
    assert got.dtype == np.float32 and got.shape == (3, 4)
    # Not bit-exact: the documented numbers differ from the algorithm's own float64 Box-Muller
    # (which sdjax follows) by up to 2.4e-7, as CUDA's float32 intrinsics would.
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)


def test_torch_cuda_recorded_stream():
    # float32 bits of A1111's rng_philox algorithm (numpy 2.4), seed 0, two successive (3, 4) draws.
    g = noise.PhiloxGenerator(0)
    first = [0xBF6CB6AD, 0xBED9C6AF, 0xC02934C5, 0x3E14AB15, 0xBDF788DC, 0xBF1468E7, 0xBF1F732F,
             0xBEA8225C, 0xBF898A98, 0xBEB9EE06, 0xBFD5E4FB, 0x4010FE09]
    got = g.randn((3, 4)).reshape(-1).view(np.uint32)
    np.testing.assert_array_equal(got, np.array(first, np.uint32))
    second = noise.PhiloxGenerator(0)
    second.offset = 1
    np.testing.assert_array_equal(g.randn((3, 4)), second.randn((3, 4)))


def test_torch_cuda_statistics_and_stream_semantics():
    x = noise.torch_randn("torch-cuda", 123, (100_000,))
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
    g, h = noise.torch_generator("torch-cuda", 9), noise.torch_generator("torch-cuda", 9)
    a, b = g.randn((2, 8)), g.randn((2, 8))
    assert not np.array_equal(a, b) and g.offset == 2
    assert g.randn((0, 4)).shape == (0, 4) and g.offset == 2  # torch launches no kernel
    assert _same_bits(h.randn((2, 8)), a) and _same_bits(h.randn((2, 8)), b)
    assert not np.array_equal(noise.torch_randn("torch-cuda", 10, (2, 8)), a)


def test_torch_cpu_statistics():
    x = noise.torch_randn("torch-cpu", 123, (100_000,))
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


# ---------------------------------------------------------------------------------------------
# Validation, speed, no torch at run time
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7", None, True])
@pytest.mark.parametrize("source", ["torch-cpu", "torch-cuda"])
def test_bad_seed(source, seed):
    with pytest.raises(ValueError) as info:
        noise.torch_randn(source, seed, (4,))
    want = f"seed={seed!r} is not a valid seed; expected an int with 0 <= seed < 2**64"
    assert str(info.value) == want


@pytest.mark.parametrize("source", ["torch", "cpu", "Torch-CPU", "", None, 3])
def test_bad_source(source):
    message = f"noise={source!r} is not a noise source; accepted: 'jax', 'torch-cpu', 'torch-cuda'"
    with pytest.raises(ValueError) as info:
        noise.check_noise_source(source)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="is not a noise source"):
        noise.torch_randn(source, 0, (4,))


def test_sources():
    assert noise.NOISE_SOURCES == ("jax", "torch-cpu", "torch-cuda")
    assert [noise.check_noise_source(s) for s in noise.NOISE_SOURCES] == list(noise.NOISE_SOURCES)
    assert isinstance(noise.torch_generator("torch-cpu", 0), noise.TorchCPUGenerator)
    assert isinstance(noise.torch_generator("torch-cuda", 0), noise.PhiloxGenerator)
    with pytest.raises(ValueError, match="'jax' has no torch generator"):
        noise.torch_generator("jax", 0)


@pytest.mark.parametrize("source", ["torch-cpu", "torch-cuda"])
def test_speed(source):
    noise.torch_randn(source, 0, (16,))  # warm up
    start = time.perf_counter()
    x = noise.torch_randn(source, 1, (4, 96, 96))
    assert time.perf_counter() - start < 1.0
    assert x.shape == (4, 96, 96) and x.dtype == np.float32


def test_module_does_not_import_torch():
    path = Path(noise.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('noise', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.torch_randn('torch-cpu', 0, (4, 8, 8)); m.torch_randn('torch-cuda', 0, (4, 8, 8))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
