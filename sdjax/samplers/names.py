"""A1111 (stable-diffusion-webui) sampler names and schedule types, to and from sdjax's.

A1111 1.9+ names a sampler and a schedule type separately ("DPM++ 2M", "Karras"); before 1.9 the
schedule was a suffix of the name ("DPM++ 2M Karras"). Both are read here (case-insensitively); a
suffix and a different explicit schedule type contradict each other and are refused (A1111 lets
the suffix win silently).

k-diffusion samplers map to sdjax's samplers with ``sigmas`` set (k-diffusion's grids over the
LDM sigma table, exactly what A1111 computes; ``sdjax.samplers.k`` / ``multistep``):

==================  ============  ==========================================
A1111               sdjax         "Automatic" schedule type (and options)
==================  ============  ==========================================
Euler a             euler_a       Uniform
Euler               euler         Uniform
LMS                 lms           Uniform
Heun                heun          Uniform
DPM++ 2M            dpmpp_2m      Karras
DPM++ 2M SDE        dpmpp_2m_sde  Exponential
DPM++ 2M SDE Heun   dpmpp_2m_sde  Exponential, solver_type "heun"
LCM                 lcm           Uniform (A1111 1.8+: its own grid of 50)
==================  ============  ==========================================

"Automatic" is each sampler's own schedule in A1111 1.9+ (its ``samplers_k_diffusion`` table:
'scheduler': 'karras' for DPM++ 2M, 'exponential' for DPM++ 2M SDE, ``model.get_sigmas`` = Uniform
otherwise). Note that before 1.9 plain "DPM++ 2M" and "DPM++ 2M SDE" meant the Uniform grid: an
old infotext without a schedule type is read as 1.9+ reads it; pass ``schedule_type="Uniform"``
to reproduce an image made before 1.9. A1111's "Enable quantization in K samplers" setting (not
written to infotexts) is the sdjax option ``quantize=True``.

A1111's timestep samplers are CompVis-style and map to the nearest sdjax sampler, not bit for bit:

- "DDIM" -> ``ddim`` with ``timestep_spacing="leading"``: with the released SD configs
  (steps_offset 1, set_alpha_to_one False) that is CompVis DDIM as A1111 ran it before 1.6: the n
  timesteps (1000 // n) k + 1, k < n, then one last step to alphas_cumprod[0] (eta 0). A1111 1.6+
  takes ts = clip(range(0, 1000, 1000 // n) + 1, 0, 999) (more than n entries when n does not
  divide 1000: 31 for n = 30), evaluates the model at all of them but ts[0] = 1, and stops at the
  noise level alphas_cumprod[1]; its images differ slightly (sdjax cannot express that grid).
- "PLMS" -> ``pndm`` with ``skip_prk_steps=True``, ``timestep_spacing="leading"``: diffusers'
  PLMS, which starts with the same pseudo improved Euler step as CompVis PLMS; A1111 1.6+ again
  stops one evaluation early.
- "UniPC" -> ``unipc`` with ``solver_order=3`` (A1111's default order): diffusers' UniPC (bh2
  variant, linspace timesteps), whereas A1111 runs the original UniPC code with its settings'
  defaults (bh1 variant, time-uniform steps in continuous time).

Going back (``to_a1111``), diffusers-style sdjax schedules name their nearest A1111 counterpart,
which samples close to but not exactly like them: without ``sigmas`` the k-samplers report
"Uniform" (diffusers' own grid) or "Karras" (``use_karras_sigmas``); ``dpmpp_2m_karras`` is
"DPM++ 2M" / "Karras". ``quantize`` is not part of A1111's infotext and is not reported.
``ddpm`` and ``tcd`` have no A1111 counterpart: they are written as "DDPM" and "TCD" (A1111 does not
know them; sdjax reads them back). A1111's "LCM" (``sdjax.samplers.few_step``) samples LCM on
k-diffusion sigmas over the distillation grid; without ``sigmas``, ``lcm`` is diffusers'
``LCMScheduler`` (other timesteps: 999, 759, 499, 259 against A1111's 999, 679, 339, 19 at 4 steps).
"""

from __future__ import annotations

from typing import Optional

# A1111 k-diffusion sampler name -> (sdjax sampler, the schedule "Automatic" stands for, options).
_K_SAMPLERS = {
    "Euler a": ("euler_a", "Uniform", {}),
    "Euler": ("euler", "Uniform", {}),
    "LMS": ("lms", "Uniform", {}),
    "Heun": ("heun", "Uniform", {}),
    "DPM++ 2M": ("dpmpp_2m", "Karras", {}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "Exponential", {}),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", "Exponential", {"solver_type": "heun"}),
    "LCM": ("lcm", "Uniform", {}),
}
_TIMESTEP_SAMPLERS = {
    "DDIM": ("ddim", {"timestep_spacing": "leading"}),
    "PLMS": ("pndm", {"skip_prk_steps": True, "timestep_spacing": "leading"}),
    "UniPC": ("unipc", {"solver_order": 3}),
}
# sdjax's own name for infotexts of the one sampler A1111 lacks; read back, never listed as A1111's.
_SDJAX_ONLY = {"DDPM": ("ddpm", {}), "TCD": ("tcd", {})}

A1111_SAMPLERS = tuple(_K_SAMPLERS) + tuple(_TIMESTEP_SAMPLERS)
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential")

_BY_LOWER = {name.lower(): name for name in (*A1111_SAMPLERS, *_SDJAX_ONLY)}
_SCHEDULE_BY_LOWER = {name.lower(): name for name in SCHEDULE_TYPES}
_K_NAMES = {(sdjax, options.get("solver_type")): a1111 for a1111, (sdjax, _, options) in _K_SAMPLERS.items()}


def _schedule_type(schedule_type: Optional[str]) -> str:
    if schedule_type is None:
        return "Automatic"
    key = str(schedule_type).strip().lower()
    if key not in _SCHEDULE_BY_LOWER:
        raise ValueError(f"unknown schedule type {schedule_type!r}; accepted: {list(SCHEDULE_TYPES)}")
    return _SCHEDULE_BY_LOWER[key]


def _split_suffix(sampler: str):
    """(A1111 sampler name, schedule type or None) of a name with or without a pre-1.9 suffix."""
    key = " ".join(str(sampler).split()).lower()
    if key in _BY_LOWER:
        return _BY_LOWER[key], None
    base, _, suffix = key.rpartition(" ")
    if base in _BY_LOWER and suffix in _SCHEDULE_BY_LOWER and suffix != "automatic":
        return _BY_LOWER[base], _SCHEDULE_BY_LOWER[suffix]
    raise ValueError(
        f"unknown A1111 sampler {sampler!r}; accepted: {list(A1111_SAMPLERS)}, optionally followed by a "
        f"schedule type {list(SCHEDULE_TYPES[1:])} as before A1111 1.9 (e.g. 'DPM++ 2M Karras')"
    )


def from_a1111(sampler: str, schedule_type: Optional[str] = None) -> tuple[str, dict]:
    """(sdjax sampler name, scheduler options) of an A1111 sampler and schedule type.

    ``schedule_type`` None or "Automatic" is the sampler's own default (A1111 1.9+). Raises
    ValueError for an unknown sampler or schedule type, a name suffix that contradicts
    ``schedule_type``, or a schedule type for a sampler that has none (DDIM, PLMS, UniPC).
    """
    name, suffix = _split_suffix(sampler)
    given = _schedule_type(schedule_type)
    if suffix is not None and given not in ("Automatic", suffix):
        raise ValueError(
            f"sampler {sampler!r} names schedule type {suffix!r} but schedule_type={schedule_type!r} was given"
        )
    chosen = suffix or given
    if name not in _K_SAMPLERS:
        if chosen != "Automatic":
            raise ValueError(
                f"sampler {name!r} takes no schedule type (got {chosen!r}); schedule types apply to "
                f"{list(_K_SAMPLERS)}"
            )
        sdjax_name, options = {**_TIMESTEP_SAMPLERS, **_SDJAX_ONLY}[name]
        return sdjax_name, dict(options)
    sdjax_name, automatic, options = _K_SAMPLERS[name]
    grid = automatic if chosen == "Automatic" else chosen
    return sdjax_name, {"sigmas": grid.lower(), **options}


def to_a1111(name: str, options: Optional[dict] = None) -> tuple[str, str]:
    """(A1111 sampler name, schedule type) of an sdjax sampler and options, for infotexts.

    The schedule type is explicit ("Uniform", "Karras", "Exponential") for the k-diffusion
    samplers, so A1111 1.9+ reads it back unambiguously, and "Automatic" for samplers without one.
    """
    options = dict(options or {})
    if name == "dpmpp_2m_karras":
        return "DPM++ 2M", "Karras"
    if (name, None) in _K_NAMES:
        grid = options.get("sigmas")
        if grid is None:
            grid = "karras" if options.get("use_karras_sigmas") else "uniform"
        a1111 = _K_NAMES.get((name, options.get("solver_type")), _K_NAMES[name, None])
        return a1111, _schedule_type(grid)
    for table in (_TIMESTEP_SAMPLERS, _SDJAX_ONLY):
        for a1111, (sdjax_name, _) in table.items():
            if sdjax_name == name:
                return a1111, "Automatic"
    from sdjax.samplers import SCHEDULERS

    raise ValueError(f"unknown scheduler {name!r}; valid names: {list(SCHEDULERS)}")


def resolve_sampler(
    name: str, schedule_type: Optional[str] = None, options: Optional[dict] = None
) -> tuple[str, dict]:
    """(sdjax sampler name, scheduler options) of an sdjax name or an A1111 name.

    An sdjax name (``SCHEDULERS``, exact) comes first; a schedule type other than "Automatic" then
    sets ``sigmas`` for the samplers that take it. Any other name is read as an A1111 name
    (``from_a1111``). ``options`` are merged on top; one that contradicts the schedule type
    (another ``sigmas``) is refused. Raises ValueError listing the accepted names and schedule types.
    """
    from sdjax.samplers import SCHEDULERS, _SAMPLERS

    options = dict(options or {})
    if name in SCHEDULERS:
        chosen = _schedule_type(schedule_type)
        derived = {}
        if chosen != "Automatic":
            if "sigmas" not in _SAMPLERS[name].options:
                takes = [n for n in SCHEDULERS if "sigmas" in _SAMPLERS[n].options]
                raise ValueError(
                    f"scheduler {name!r} takes no schedule type (got {chosen!r}); schedule types apply to {takes}"
                )
            derived = {"sigmas": chosen.lower()}
    else:
        try:
            name, derived = from_a1111(name, schedule_type)
        except ValueError as error:
            if "unknown A1111 sampler" not in str(error):
                raise
            raise ValueError(
                f"unknown sampler {name!r}; accepted: sdjax names {list(SCHEDULERS)} or A1111 names "
                f"{list(A1111_SAMPLERS)} (pre-1.9 suffixes such as 'DPM++ 2M Karras' too), with schedule "
                f"types {list(SCHEDULE_TYPES)}"
            ) from None
    if "sigmas" in derived and options.get("sigmas", derived["sigmas"]) != derived["sigmas"]:
        raise ValueError(
            f"sampler {name!r}: options sigmas={options['sigmas']!r} contradicts schedule type "
            f"{derived['sigmas'].capitalize()!r}"
        )
    return name, {**derived, **options}
