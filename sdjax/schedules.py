"""Noise schedules and sigma grids, computed on the host with numpy.

Pure functions of the model's training schedule (``SchedulerConfig``) and a step count. They
reproduce the float32 / float64 arithmetic of diffusers' torch tables, so the samplers built on
them (``sdjax.samplers``) follow diffusers' trajectories step for step.
"""

from __future__ import annotations

import math

import numpy as np

from sdjax.config import SchedulerConfig

_F32 = np.float32


# --------------------------------------------------------------------------------------------
# Training noise schedule
# --------------------------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=float32)``: fp32 step, each half anchored at its end."""
    start32, end32 = _F32(start), _F32(end)
    if num == 1:
        return np.array([start32], _F32)
    step = _F32((end32 - start32) / _F32(num - 1))
    idx = np.arange(num)
    from_start = np.float64(start32) + np.float64(step) * idx
    from_end = np.float64(end32) - np.float64(step) * (num - 1 - idx)
    return np.where(idx < num // 2, from_start, from_end).astype(_F32)


def _linspace_f64(start: float, end: float, num: int) -> np.ndarray:
    """``torch.linspace(start, end, num, dtype=float64)``, each half anchored at its end."""
    if num == 1:
        return np.array([start], np.float64)
    step = (end - start) / (num - 1)
    idx = np.arange(num)
    return np.where(idx < num // 2, start + step * idx, end - step * (num - 1 - idx))


def _cumprod_f32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor, which accumulates in float64."""
    return np.cumprod(values.astype(np.float64)).astype(_F32)


def _squaredcos_cap_v2_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num), max_beta) for i in range(num)]
    return np.array(betas, np.float64).astype(_F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (arXiv:2305.08891, Alg. 1)."""
    root = np.sqrt(_cumprod_f32(_F32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (_F32(1.0) - alphas).astype(_F32)


def training_betas(config: SchedulerConfig) -> np.ndarray:
    """The float32 betas of the model's training schedule."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, np.float64).astype(_F32)
    if config.beta_schedule == "linear":
        return _linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root
    if config.beta_schedule == "squaredcos_cap_v2":
        return _squaredcos_cap_v2_betas(n)
    raise ValueError(
        f"beta_schedule={config.beta_schedule!r} is not supported; "
        "supported: ['linear', 'scaled_linear', 'squaredcos_cap_v2']"
    )


def training_alphas_cumprod(config: SchedulerConfig, *, zero_snr: bool, terminal_fix: bool) -> np.ndarray:
    """float32 alpha_bar(t). ``zero_snr`` applies the config's rescale (for samplers that support
    it); ``terminal_fix`` then sets the last value to 2**-24 as diffusers' sigma-based samplers do,
    so that sigma stays finite."""
    betas = training_betas(config)
    rescale = zero_snr and config.rescale_betas_zero_snr
    if rescale:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(_F32(1.0) - betas)
    if rescale and terminal_fix:
        alphas_cumprod[-1] = _F32(2.0**-24)
    return alphas_cumprod


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigma(t) = sqrt((1 - alpha_bar) / alpha_bar), in float32."""
    return np.sqrt((_F32(1.0) - alphas_cumprod) / alphas_cumprod).astype(_F32)


# --------------------------------------------------------------------------------------------
# Sampling timesteps (the config's timestep_spacing)
# --------------------------------------------------------------------------------------------


def discrete_timesteps(config: SchedulerConfig, n: int, *, round_linspace: bool) -> np.ndarray:
    """Descending timesteps of DDIM, DDPM and the k-diffusion samplers, as float64 values."""
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, num_train - 1, n)
        return (t.round() if round_linspace else t)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (num_train // n)).round()[::-1] + config.steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0  # trailing


def multistep_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Descending integer timesteps of DPM-Solver and UniPC (n + 1 points, the last dropped)."""
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = num_train // (n + 1)
        return (np.arange(n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    return np.arange(num_train, 0, -num_train / n).round().astype(np.int64) - 1  # trailing


def pndm_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """Ascending integer timesteps of PNDM."""
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round().astype(np.int64)
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (num_train // n)).round().astype(np.int64) + config.steps_offset
    return np.round(np.arange(num_train, 0, -num_train / n))[::-1].astype(np.int64) - 1


def consistency_timesteps(num_train: int, n: int, original_steps: int, strength: float = 1.0) -> np.ndarray:
    """Descending integer timesteps of LCM and TCD: ``n`` of the distillation grid (every
    ``num_train // original_steps``-th timestep, ending at that step minus one), evenly spaced in index.

    ``strength`` < 1 keeps the lowest ``int(original_steps * strength)`` grid points and spreads the ``n``
    steps over them (diffusers' ``set_timesteps(strength=)``, as its LCM image-to-image pipeline calls it).
    """
    if not 1 <= original_steps <= num_train:
        raise ValueError(f"original_inference_steps must be between 1 and {num_train}, got {original_steps}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if n > original_steps:
        raise ValueError(f"num_steps={n} cannot exceed original_inference_steps={original_steps}")
    grid_size = int(original_steps * strength)
    if grid_size < n:
        raise ValueError(
            f"original_inference_steps * strength = {original_steps} * {strength} leaves {grid_size} grid timesteps, "
            f"fewer than num_steps={n}"
        )
    stride = num_train // original_steps
    grid = (np.arange(1, grid_size + 1) * stride - 1)[::-1]
    picks = np.floor(np.linspace(0, grid_size, num=n, endpoint=False)).astype(np.int64)
    return grid[picks].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Sigma grids
# --------------------------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: uniform in sigma**(1/rho), float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, log_sigma_table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigma_table[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigma_table) - 2)
    lo, hi = log_sigma_table[low], log_sigma_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def interp_sigmas(sigma_table: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """sigma at (fractional) training timesteps, interpolating linearly in t."""
    return np.interp(timesteps, np.arange(len(sigma_table)), sigma_table)


def k_diffusion_sigmas(config: SchedulerConfig, n: int, alphas_cumprod: np.ndarray, use_karras_sigmas: bool):
    """Timesteps (float32) and sigmas (float32, a final 0 appended) of Euler, Heun and LMS."""
    sigma_table = sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = discrete_timesteps(config, n, round_linspace=False).astype(_F32)
    sigmas = interp_sigmas(sigma_table, timesteps)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        timesteps = sigma_to_timestep(sigmas, np.log(sigma_table)).astype(_F32)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(_F32)


def k_diffusion_init_sigma(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """The scale of the initial noise of the k-diffusion samplers."""
    sigma_max = sigmas.max()
    if config.timestep_spacing in ("linspace", "trailing"):
        return float(sigma_max)
    return float(np.sqrt(sigma_max * sigma_max + _F32(1.0)))


def multistep_sigmas(
    config: SchedulerConfig, n: int, alphas_cumprod: np.ndarray, use_karras_sigmas: bool, round_karras_timesteps: bool
):
    """Timesteps and sigmas (a final 0 appended) of DPM-Solver and UniPC."""
    sigma_table = sigmas_from_alphas_cumprod(alphas_cumprod)
    timesteps = multistep_timesteps(config, n)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(sigma_table[0]), float(sigma_table[-1]), n)
        timesteps = sigma_to_timestep(sigmas, np.log(sigma_table))
        if round_karras_timesteps:
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    else:
        sigmas = interp_sigmas(sigma_table, timesteps)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(_F32)


# --------------------------------------------------------------------------------------------
# k-diffusion grids (A1111 / ComfyUI): the sampler option ``sigmas``
# --------------------------------------------------------------------------------------------

K_DIFFUSION_GRIDS = ("uniform", "karras", "exponential")


def ldm_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar(t) as the original LDM / SGM code registers it (what A1111 samples with): the betas
    and their cumulative product in float64 (the LDM "linear" schedule is diffusers' "scaled_linear"),
    rounded to float32 once at the end. The zero-terminal-SNR rescale is not applied."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = _linspace_f64(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    elif config.beta_schedule == "linear":
        betas = _linspace_f64(config.beta_start, config.beta_end, n)
    else:
        betas = training_betas(config).astype(np.float64)
    return np.cumprod(1.0 - betas).astype(_F32)


def k_diffusion_sigma_table(config: SchedulerConfig) -> np.ndarray:
    """k-diffusion's ``DiscreteEpsDDPMDenoiser.sigmas``: ((1 - alpha_bar) / alpha_bar) ** 0.5 in
    float32 from the float32 LDM alpha_bar, ascending in t."""
    alphas_cumprod = ldm_alphas_cumprod(config)
    return np.sqrt((_F32(1.0) - alphas_cumprod) / alphas_cumprod).astype(_F32)


def uniform_sigmas(sigma_table: np.ndarray, n: int) -> np.ndarray:
    """k-diffusion ``DiscreteSchedule.get_sigmas(n)``: t = linspace(t_max, 0, n), sigma(t) interpolated
    linearly in log sigma between the neighbouring table entries (float32 throughout)."""
    return interp_log_sigmas(sigma_table, _linspace_f32(len(sigma_table) - 1, 0, n))


def interp_log_sigmas(sigma_table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """k-diffusion ``DiscreteSchedule.t_to_sigma``: sigma at fractional table indices ``t`` (float32),
    interpolated linearly in log sigma between the neighbouring entries."""
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = (t - np.floor(t)).astype(_F32)
    log_table = np.log(sigma_table).astype(_F32)
    log_sigma = (_F32(1.0) - w) * log_table[low] + w * log_table[high]
    return np.exp(log_sigma).astype(_F32)


def karras_sigmas_f32(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """k-diffusion ``get_sigmas_karras`` (without the final 0): float32 like its torch tensors."""
    ramp = _linspace_f32(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((_F32(max_inv_rho) + ramp * _F32(min_inv_rho - max_inv_rho)) ** _F32(rho)).astype(_F32)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """k-diffusion ``get_sigmas_exponential`` (without the final 0): uniform in log sigma, float32."""
    return np.exp(_linspace_f32(math.log(sigma_max), math.log(sigma_min), n)).astype(_F32)


def k_diffusion_sigma_to_t(sigmas: np.ndarray, sigma_table: np.ndarray, quantize: bool) -> np.ndarray:
    """k-diffusion ``DiscreteSchedule.sigma_to_t`` in float32: the fractional training timestep of
    each sigma (linear in log sigma between table entries), or with ``quantize`` the index of the
    nearest entry in log sigma (A1111's "Enable quantization in K samplers")."""
    log_table = np.log(sigma_table).astype(_F32)
    log_sigma = np.log(sigmas.astype(_F32)).astype(_F32)
    dists = log_sigma[None, :] - log_table[:, None]
    if quantize:
        return np.abs(dists).argmin(axis=0).astype(_F32)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1).astype(_F32)
    return ((_F32(1.0) - w) * low.astype(_F32) + w * (low + 1).astype(_F32)).astype(_F32)


def k_diffusion_grid(config: SchedulerConfig, n: int, grid: str, quantize: bool = False):
    """U-Net timesteps (float32) and sigmas (float32, a final 0 appended) of an A1111 schedule type.

    ``grid`` is "uniform" (``get_sigmas(n)``), "karras" (rho = 7) or "exponential", the last two
    between the table's extremes (A1111: ``model.sigmas[0]`` and ``[-1]``)."""
    if grid not in K_DIFFUSION_GRIDS:
        raise ValueError(f"sigmas={grid!r} is not supported; choose from {list(K_DIFFUSION_GRIDS)}")
    table = k_diffusion_sigma_table(config)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if grid == "uniform":
        sigmas = uniform_sigmas(table, n)
    elif grid == "karras":
        sigmas = karras_sigmas_f32(n, sigma_min, sigma_max)
    else:
        sigmas = exponential_sigmas(n, sigma_min, sigma_max)
    timesteps = k_diffusion_sigma_to_t(sigmas, table, quantize)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(_F32)


def lcm_a1111_grid(config: SchedulerConfig, n: int, grid: str, original_steps: int = 50):
    """U-Net timesteps (float32) and sigmas (float32, a final 0 appended) of A1111's "LCM" sampler.

    A1111 samples LCM on k-diffusion's sigmas restricted to the distillation grid (the LDM table at
    the ``original_steps`` timesteps T - 1, T - 1 - T // original_steps, ...). "uniform" (its
    Automatic schedule) spaces the steps evenly in grid index, linearly interpolated in log sigma;
    "karras" and "exponential" span that grid's extreme sigmas. Each sigma's U-Net timestep is the
    grid timestep nearest in log sigma.
    """
    if grid not in K_DIFFUSION_GRIDS:
        raise ValueError(f"sigmas={grid!r} is not supported; choose from {list(K_DIFFUSION_GRIDS)}")
    num_train = config.num_train_timesteps
    if not 1 <= original_steps <= num_train:
        raise ValueError(f"original_inference_steps must be between 1 and {num_train}, got {original_steps}")
    stride = num_train // original_steps
    grid_timesteps = num_train - 1 - np.arange(original_steps)[::-1] * stride  # ascending
    table = k_diffusion_sigma_table(config)[grid_timesteps]
    if grid == "uniform":
        first, last = _F32(grid_timesteps[-1]), _F32(grid_timesteps[0])
        t = (_linspace_f32(first, last, n) - last) / _F32(stride)
        sigmas = interp_log_sigmas(table, np.clip(t, 0, original_steps - 1).astype(_F32))
    elif grid == "karras":
        sigmas = karras_sigmas_f32(n, float(table[0]), float(table[-1]))
    else:
        sigmas = exponential_sigmas(n, float(table[0]), float(table[-1]))
    nearest = k_diffusion_sigma_to_t(sigmas, table, quantize=True).astype(np.int64)
    return grid_timesteps[nearest].astype(_F32), np.concatenate([sigmas, [0.0]]).astype(_F32)
