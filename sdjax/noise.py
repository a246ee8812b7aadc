"""Torch-compatible initial noise, drawn with numpy (torch is never imported).

``torch-cpu`` reproduces ``torch.randn`` on the CPU generator (ComfyUI's noise, A1111's "CPU"
source): mt19937 seeded as ATen's ``CPUGeneratorImpl`` seeds it, then ATen's CPU normal sampler
(``aten/src/ATen/native/cpu/DistributionTemplates.h``): for >= 16 elements, float32 uniforms for
the whole tensor and Box-Muller over chunks of 16 (element j paired with j+8; a partial last
chunk is redrawn over the final 16 slots) with the cephes log/sincos of ``avx_mathfun.h`` that
torch's x86 AVX2/AVX512 kernels run, FMAs fused as GCC fuses them; below 16 elements the scalar
``at::normal_distribution<double>``, whose second Box-Muller value stays cached in the generator.

``torch-cuda`` is the Philox4x32-10 stream A1111's "NV" source uses to imitate
``torch.randn(device="cuda")``: element i takes counter (offset, 0, i, 0) and key (seed lo, hi),
keeps the sine of the Box-Muller pair of output words 0 and 1, and each call advances the offset.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

NOISE_SOURCES = ("jax", "torch-cpu", "torch-cuda")
"""Accepted ``noise=`` values; "jax" is drawn by ``jax.random`` elsewhere."""

_F = np.float32
_U = np.uint32


def check_noise_source(source: object) -> str:
    """Return ``source`` if it names a noise source, else raise ``ValueError`` listing them."""
    if isinstance(source, str) and source in NOISE_SOURCES:
        return source
    accepted = ", ".join(repr(s) for s in NOISE_SOURCES)
    raise ValueError(f"noise={source!r} is not a noise source; accepted: {accepted}")


def _check_seed(seed: object) -> int:
    """Validate a seed as torch accepts it: a Python int with 0 <= seed < 2**64."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(
            f"seed={seed!r} is not a valid seed; expected an int with 0 <= seed < 2**64")
    return int(seed)


def _numel(shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Normalise ``shape`` (an int or a sequence of ints) and count its elements."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape={shape!r} has a negative dimension")
    return dims, math.prod(dims)


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """Correctly rounded float32 ``a * b + c`` (one rounding, as the vfmadd instructions)."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)  # exact: 24 x 24 bits fit in 53
    c = np.asarray(c, np.float64)
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)  # TwoSum: s + err == p + c exactly
    # Round to odd at 53 bits, so the final rounding to 24 bits is not a double rounding.
    fix = (err != 0) & ((s.view(np.uint64) & 1) == 0)
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_F)


_LOG_P = [_F(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                          3.3333331174e-1)]


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """ATen ``log256_ps`` (cephes logf) for positive normal float32 ``x``, as GCC fuses it."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(_F) + _F(1)
    m = ((bits & ~0x7F800000) | _F(0.5).view(np.int32)).view(_F)  # mantissa in [0.5, 1)
    small = m < _F(0.707106781186547524)
    m = (m - _F(1)) + np.where(small, m, _F(0))
    e = e - np.where(small, _F(1), _F(0))
    z = m * m
    y = np.full_like(m, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, m, p)
    y = _fma(y * m, z, e * _F(-2.12194440e-4))
    y = y - z * _F(0.5)
    return (m + y) + e * _F(0.693359375)  # e * 0.693359375 is exact, so the fused add rounds alike


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ATen ``sincos256_ps`` (cephes sinf/cosf, argument reduced by 4/pi), as GCC fuses it."""
    neg = np.signbit(x)
    x = np.abs(x)
    j = ((x * _F(1.27323954473516)).astype(np.int32) + 1) & ~1
    y = j.astype(_F)
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, _F(dp), x)
    z = x * x
    cos_p = _fma(_fma(np.full_like(z, _F(2.443315711809948e-5)), z, _F(-1.388731625493765e-3)),
                 z, _F(4.166664568298827e-2))
    cos_p = _fma(cos_p * z, z, -(z * _F(0.5))) + _F(1)
    sin_p = _fma(_fma(np.full_like(z, _F(-1.9515295891e-4)), z, _F(8.3321608736e-3)),
                 z, _F(-1.6666654611e-1))
    sin_p = _fma(sin_p * z, x, x)
    first = (j & 2) == 0
    s = np.where(first, sin_p, cos_p) + _F(0)
    c = np.where(first, cos_p, sin_p) + _F(0)
    s = np.where(neg ^ ((j & 4) != 0), -s, s)
    c = np.where((~(j - 2) & 4) != 0, -c, c)
    return s, c


def _normal_fill_16(u: np.ndarray) -> np.ndarray:
    """Box-Muller over rows of 16 float32 uniforms: out[j] = r cos, out[j + 8] = r sin."""
    radius = np.sqrt(_F(-2) * _log_avx2(_F(1) - u[:, :8]))
    s, c = _sincos_avx2(_F(2.0 * math.pi) * u[:, 8:])
    return np.concatenate([radius * c, radius * s], axis=1) + _F(0)


class TorchCPUGenerator:
    """numpy twin of ``torch.Generator().manual_seed(seed)``; ``randn`` continues its stream."""

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        state = [self.seed & 0xFFFFFFFF]  # at::mt19937 keeps only the low 32 bits of the seed
        for i in range(1, 624):
            state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
        self._state = np.array(state, dtype=_U)
        self._pos = 624  # words of the current state already used; 624 means twist first
        self._cached_normal: float | None = None  # at::normal_distribution<double>'s spare value

    def _twist(self) -> None:
        """Regenerate the 624-word state in place (three vectorised blocks and the last word)."""
        x, y = self._state, np.empty_like(self._state)

        def mix(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
            v = (hi & _U(0x80000000)) | (lo & _U(0x7FFFFFFF))
            return (v >> _U(1)) ^ np.where(lo & _U(1), _U(0x9908B0DF), _U(0))

        y[:227] = x[397:] ^ mix(x[:227], x[1:228])
        y[227:454] = y[:227] ^ mix(x[227:454], x[228:455])
        y[454:623] = y[227:396] ^ mix(x[454:623], x[455:624])
        y[623:] = y[396:397] ^ mix(x[623:], y[:1])
        self._state, self._pos = y, 0

    def random_u32(self, n: int) -> np.ndarray:
        """The next ``n`` tempered 32-bit outputs (``CPUGeneratorImpl::random``)."""
        parts = []
        while n > 0:
            if self._pos == 624:
                self._twist()
            take = min(n, 624 - self._pos)
            parts.append(self._state[self._pos:self._pos + take])
            self._pos, n = self._pos + take, n - take
        y = np.concatenate(parts) if parts else np.empty(0, _U)
        y = y ^ (y >> _U(11))
        y = y ^ ((y << _U(7)) & _U(0x9D2C5680))
        y = y ^ ((y << _U(15)) & _U(0xEFC60000))
        return y ^ (y >> _U(18))

    def _uniform_f32(self, n: int) -> np.ndarray:
        """``at::uniform_real_distribution<float>(0, 1)``: low 24 bits times 2**-24."""
        return (self.random_u32(n) & _U(0xFFFFFF)).astype(_F) * _F(2.0**-24)

    def _scalar_normal(self) -> float:
        """``at::normal_distribution<double>(0, 1)`` with the generator's cached spare value."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        w = [int(v) for v in self.random_u32(4)]  # two random64() draws, 53 low bits each
        u1 = (((w[0] << 32) | w[1]) & (2**53 - 1)) * 2.0**-53
        u2 = (((w[2] << 32) | w[3]) & (2**53 - 1)) * 2.0**-53
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Next ``torch.randn(shape, generator=g)`` (float32) of this generator's stream."""
        dims, n = _numel(shape)
        if n < 16:  # float64 samples rounded to float32, as static_cast<float>
            values = [self._scalar_normal() for _ in range(n)]
            return np.array(values, dtype=np.float64).astype(_F).reshape(dims)
        u = self._uniform_f32(n)
        full = n - n % 16
        out = np.empty(n, _F)
        out[:full] = _normal_fill_16(u[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:  # torch redraws 16 uniforms and recomputes the last 16 slots
            out[n - 16:] = _normal_fill_16(self._uniform_f32(16).reshape(1, 16)).reshape(-1)
        return out.reshape(dims)


_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (_U(0x9E3779B9), _U(0xBB67AE85))


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 (Random123): ``counter`` (4, N) and ``key`` (2, N) uint32 -> (4, N) uint32."""
    c = [np.asarray(w, _U) for w in counter]
    k = [np.asarray(w, _U) for w in key]
    for r in range(10):
        if r:
            k = [k[0] + _PHILOX_W[0], k[1] + _PHILOX_W[1]]
        p0 = c[0].astype(np.uint64) * _PHILOX_M[0]
        p1 = c[2].astype(np.uint64) * _PHILOX_M[1]
        hi0, lo0 = (p0 >> np.uint64(32)).astype(_U), p0.astype(_U)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(_U), p1.astype(_U)
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
    return np.stack(c)


class PhiloxGenerator:
    """numpy twin of A1111's "NV" generator (torch CUDA ``randn`` stream); ``randn`` advances it."""

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        self.offset = 0

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Next draw (float32): element i from counter (offset lo, hi, i lo, hi); offset += 1.

        As in A1111, each call advances the offset by one (torch advances it by more for tensors
        larger than the GPU's thread grid, which this does not model); an empty draw, which
        launches no kernel in torch, leaves it unchanged.
        """
        dims, n = _numel(shape)
        if n == 0:
            return np.empty(dims, _F)
        idx = np.arange(n, dtype=np.uint64)
        zeros = np.zeros(n, _U)
        counter = np.stack([zeros + _U(self.offset & 0xFFFFFFFF), zeros + _U(self.offset >> 32),
                            idx.astype(_U), (idx >> np.uint64(32)).astype(_U)])
        key = np.stack([zeros + _U(self.seed & 0xFFFFFFFF), zeros + _U(self.seed >> 32)])
        self.offset += 1
        x, y = philox4x32_10(counter, key)[:2]
        # curand's Box-Muller constants, evaluated in float64 as numpy promotes them in A1111.
        inv = np.float64(_F(2.3283064e-10))
        inv_2pi = np.float64(_F(2.3283064e-10 * 6.2831855))
        u = x * inv + inv / 2
        v = y * inv_2pi + inv_2pi / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F).reshape(dims)


def torch_generator(source: str, seed: int) -> TorchCPUGenerator | PhiloxGenerator:
    """A fresh stateful generator for ``"torch-cpu"`` or ``"torch-cuda"`` seeded with ``seed``."""
    check_noise_source(source)
    if source == "torch-cpu":
        return TorchCPUGenerator(seed)
    if source == "torch-cuda":
        return PhiloxGenerator(seed)
    accepted = ", ".join(repr(s) for s in NOISE_SOURCES)
    raise ValueError(f"noise={source!r} has no torch generator; torch sources are 'torch-cpu', "
                     f"'torch-cuda' (noise sources: {accepted})")


def torch_randn(source: str, seed: int, shape: int | Sequence[int]) -> np.ndarray:
    """One ``randn(shape)`` draw from a fresh ``torch_generator(source, seed)``."""
    return torch_generator(source, seed).randn(shape)


def image_noise(
    source: str, seeds: Sequence[int], latent_shape: Sequence[int], step_draws: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Initial and per-step noise drawn as AUTOMATIC1111 (its ``ImageRNG``) and diffusers (a list of
    generators, one per image) draw it: image i has its own generator seeded with ``seeds[i]``; its first
    draw, NCHW ``(c, h, w)`` as torch draws latents, is the initial noise, and ``step_draws`` further draws
    of that shape are the noise a stochastic sampler adds, in order.

    ``latent_shape`` is sdjax's NHWC ``(h, w, c)``; returns ``(noise (B, h, w, c), steps (B, step_draws,
    h, w, c) or None)`` in float32.
    """
    h, w, c = latent_shape
    initial, steps = [], []
    for seed in seeds:
        generator = torch_generator(source, int(seed))
        initial.append(generator.randn((c, h, w)).transpose(1, 2, 0))
        if step_draws:
            steps.append(np.stack([generator.randn((c, h, w)).transpose(1, 2, 0) for _ in range(step_draws)]))
    return np.stack(initial), (np.stack(steps) if step_draws else None)
