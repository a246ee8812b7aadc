"""A1111 sampler names and schedule types, both ways, and that the new options change nothing by default."""

import jax
import numpy as np
import pytest

from sdjax import samplers
from sdjax.config import SchedulerConfig
from sdjax.samplers import (
    A1111_SAMPLERS,
    SCHEDULE_TYPES,
    SCHEDULERS,
    from_a1111,
    make_schedule,
    resolve_sampler,
    to_a1111,
)

SD_CONFIG = SchedulerConfig()

# A1111 1.9+: each sampler's "Automatic" schedule (its samplers_k_diffusion 'scheduler' option).
K_EXPECTED = {
    "Euler a": ("euler_a", "uniform"),
    "Euler": ("euler", "uniform"),
    "LMS": ("lms", "uniform"),
    "Heun": ("heun", "uniform"),
    "DPM++ 2M": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 2M SDE Heun": ("dpmpp_2m_sde", "exponential"),
    "LCM": ("lcm", "uniform"),
}
K_EXTRA = {"DPM++ 2M SDE Heun": {"solver_type": "heun"}}
TIMESTEP_EXPECTED = {
    "DDIM": ("ddim", {"timestep_spacing": "leading"}),
    "PLMS": ("pndm", {"skip_prk_steps": True, "timestep_spacing": "leading"}),
    "UniPC": ("unipc", {"solver_order": 3}),
}


def test_accepted_names():
    assert A1111_SAMPLERS == tuple(K_EXPECTED) + tuple(TIMESTEP_EXPECTED)
    assert SCHEDULE_TYPES == ("Automatic", "Uniform", "Karras", "Exponential")


@pytest.mark.parametrize("schedule_type", [None, "Automatic", "Uniform", "Karras", "Exponential"])
@pytest.mark.parametrize("sampler", list(K_EXPECTED))
def test_k_samplers_from_a1111(sampler, schedule_type):
    name, automatic = K_EXPECTED[sampler]
    grid = automatic if schedule_type in (None, "Automatic") else schedule_type.lower()
    assert from_a1111(sampler, schedule_type) == (name, {"sigmas": grid, **K_EXTRA.get(sampler, {})})
    # Every result builds a schedule on that grid.
    schedule = make_schedule(name, SD_CONFIG, 5, **from_a1111(sampler, schedule_type)[1])
    assert schedule.option("sigmas") == grid


@pytest.mark.parametrize("sampler", list(TIMESTEP_EXPECTED))
def test_timestep_samplers_from_a1111(sampler):
    assert from_a1111(sampler) == TIMESTEP_EXPECTED[sampler]
    assert from_a1111(sampler, "Automatic") == TIMESTEP_EXPECTED[sampler]
    name, options = from_a1111(sampler)
    make_schedule(name, SD_CONFIG, 10, **options)  # valid options
    with pytest.raises(ValueError, match=rf"sampler '{sampler}' takes no schedule type \(got 'Karras'\)"):
        from_a1111(sampler, "Karras")
    with pytest.raises(ValueError, match="takes no schedule type"):
        from_a1111(f"{sampler} Exponential")


@pytest.mark.parametrize("suffix", ["Uniform", "Karras", "Exponential"])
@pytest.mark.parametrize("sampler", list(K_EXPECTED))
def test_pre_19_suffixed_names(sampler, suffix):
    """"DPM++ 2M Karras", "Euler Uniform", "DPM++ 2M SDE Exponential", "LMS Karras", ..."""
    expected = (K_EXPECTED[sampler][0], {"sigmas": suffix.lower(), **K_EXTRA.get(sampler, {})})
    assert from_a1111(f"{sampler} {suffix}") == expected
    assert from_a1111(f"{sampler} {suffix}", "Automatic") == expected
    assert from_a1111(f"{sampler} {suffix}", suffix.upper()) == expected  # agreeing: fine
    for other in {"Uniform", "Karras", "Exponential"} - {suffix}:
        with pytest.raises(ValueError, match=f"names schedule type '{suffix}' but schedule_type='{other}'"):
            from_a1111(f"{sampler} {suffix}", other)


def test_real_pre_19_names():
    assert from_a1111("DPM++ 2M Karras") == ("dpmpp_2m", {"sigmas": "karras"})
    assert from_a1111("LMS Karras") == ("lms", {"sigmas": "karras"})
    assert from_a1111("DPM++ 2M SDE Karras") == ("dpmpp_2m_sde", {"sigmas": "karras"})


@pytest.mark.parametrize(
    "sampler,schedule_type,expected",
    [
        ("euler A", None, ("euler_a", {"sigmas": "uniform"})),
        ("EULER A", "karras", ("euler_a", {"sigmas": "karras"})),
        ("euler", "KARRAS", ("euler", {"sigmas": "karras"})),
        ("dpm++ 2m   karras", None, ("dpmpp_2m", {"sigmas": "karras"})),
        ("Dpm++ 2M sde", "EXPONENTIAL", ("dpmpp_2m_sde", {"sigmas": "exponential"})),
        (" lms ", "uniform", ("lms", {"sigmas": "uniform"})),
        ("ddim", "automatic", ("ddim", {"timestep_spacing": "leading"})),
        ("UNIPC", None, ("unipc", {"solver_order": 3})),
    ],
)
def test_case_and_space_insensitive(sampler, schedule_type, expected):
    assert from_a1111(sampler, schedule_type) == expected


def test_unknown_names_list_accepted_values():
    with pytest.raises(ValueError, match=r"unknown A1111 sampler 'DPM fast'; accepted: \['Euler a', 'Euler'.*'UniPC'\]"):
        from_a1111("DPM fast")
    with pytest.raises(ValueError, match=r"unknown A1111 sampler 'Euler Polyexponential'"):
        from_a1111("Euler Polyexponential")
    with pytest.raises(ValueError, match=r"unknown A1111 sampler 'Euler Automatic'"):
        from_a1111("Euler Automatic")
    with pytest.raises(
        ValueError, match=r"unknown schedule type 'SGM Uniform'; accepted: \['Automatic', 'Uniform', 'Karras', 'Exponential'\]"
    ):
        from_a1111("Euler", "SGM Uniform")
    with pytest.raises(ValueError, match=r"unknown sampler 'dpm_fast'; accepted: sdjax names \['ddim'.*'tcd'\] or A1111 names \['Euler a'.*schedule types \['Automatic'"):
        resolve_sampler("dpm_fast")
    with pytest.raises(ValueError, match="unknown schedule type 'Beta'"):
        resolve_sampler("euler", "Beta")
    with pytest.raises(ValueError, match="unknown schedule type 'Beta'"):
        resolve_sampler("Euler", "Beta")
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpm_fast'; valid names"):
        to_a1111("dpm_fast", {})


def test_to_a1111():
    cases = {
        ("euler_a", ()): ("Euler a", "Uniform"),
        ("euler", (("sigmas", "karras"),)): ("Euler", "Karras"),
        ("lms", (("sigmas", "exponential"), ("quantize", True))): ("LMS", "Exponential"),
        ("heun", (("use_karras_sigmas", True),)): ("Heun", "Karras"),
        ("dpmpp_2m", ()): ("DPM++ 2M", "Uniform"),
        ("dpmpp_2m", (("sigmas", "karras"),)): ("DPM++ 2M", "Karras"),
        ("dpmpp_2m_karras", ()): ("DPM++ 2M", "Karras"),
        ("dpmpp_2m_sde", (("sigmas", "exponential"),)): ("DPM++ 2M SDE", "Exponential"),
        ("dpmpp_2m_sde", (("sigmas", "karras"), ("solver_type", "heun"))): ("DPM++ 2M SDE Heun", "Karras"),
        ("dpmpp_2m_sde", (("solver_type", "midpoint"),)): ("DPM++ 2M SDE", "Uniform"),
        ("ddim", ()): ("DDIM", "Automatic"),
        ("pndm", ()): ("PLMS", "Automatic"),
        ("unipc", ()): ("UniPC", "Automatic"),
        ("ddpm", ()): ("DDPM", "Automatic"),
        ("lcm", ()): ("LCM", "Uniform"),
        ("tcd", ()): ("TCD", "Automatic"),
    }
    for (name, options), expected in cases.items():
        assert to_a1111(name, dict(options)) == expected, name
    assert {name for name, _ in cases} == set(SCHEDULERS)


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
@pytest.mark.parametrize("sampler", A1111_SAMPLERS)
def test_round_trip(sampler, schedule_type):
    """A1111 -> sdjax -> A1111 keeps the sampler and the schedule (Automatic made explicit)."""
    if sampler in TIMESTEP_EXPECTED and schedule_type != "Automatic":
        return
    name, options = from_a1111(sampler, schedule_type)
    back = to_a1111(name, options)
    assert back[0] == sampler
    assert from_a1111(*back) == (name, options)
    if schedule_type != "Automatic":
        assert back[1] == schedule_type


def test_round_trip_sdjax_names():
    for name in SCHEDULERS:
        if name == "dpmpp_2m_karras":
            assert resolve_sampler(*to_a1111(name, {})) == ("dpmpp_2m", {"sigmas": "karras"})
            continue
        back = resolve_sampler(*to_a1111(name, {"sigmas": "exponential"} if name in ("euler", "lms") else {}))
        assert back[0] == name


def test_resolve_sampler():
    assert resolve_sampler("euler") == ("euler", {})
    assert resolve_sampler("euler", "Automatic", {"quantize": False}) == ("euler", {"quantize": False})
    assert resolve_sampler("euler", "karras") == ("euler", {"sigmas": "karras"})
    assert resolve_sampler("dpmpp_2m_sde", "Exponential", {"solver_type": "heun"}) == (
        "dpmpp_2m_sde", {"sigmas": "exponential", "solver_type": "heun"})
    assert resolve_sampler("DPM++ 2M", None, {"quantize": True}) == ("dpmpp_2m", {"sigmas": "karras", "quantize": True})
    assert resolve_sampler("DPM++ 2M Karras", options={"sigmas": "karras"}) == ("dpmpp_2m", {"sigmas": "karras"})
    assert resolve_sampler("DDIM", options={"eta": 0.5}) == ("ddim", {"timestep_spacing": "leading", "eta": 0.5})
    # sdjax names win: "ddim" is sdjax's DDIM with the model config's own spacing.
    assert resolve_sampler("ddim") == ("ddim", {})
    with pytest.raises(ValueError, match=r"options sigmas='uniform' contradicts schedule type 'Karras'"):
        resolve_sampler("DPM++ 2M", "Karras", {"sigmas": "uniform"})
    with pytest.raises(ValueError, match=r"contradicts schedule type 'Exponential'"):
        resolve_sampler("euler", "Exponential", {"sigmas": "karras"})
    with pytest.raises(ValueError, match=r"scheduler 'ddim' takes no schedule type \(got 'Karras'\); schedule types apply to \['lms', 'euler', 'euler_a', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde', 'lcm'\]"):
        resolve_sampler("ddim", "Karras")
    with pytest.raises(ValueError, match="names schedule type 'Karras' but schedule_type='Uniform'"):
        resolve_sampler("DPM++ 2M Karras", "Uniform")


# Nothing changes unless asked: sigmas=None / quantize=False are bit-identical to the old schedules.


def _leaves(schedule):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(schedule)]


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("name", ["lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde"])
def test_default_options_bit_identical(name, steps):
    for config in (SD_CONFIG, SchedulerConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True),
                   SchedulerConfig(timestep_spacing="leading", clip_sample=True)):
        default = make_schedule(name, config, steps)
        explicit = make_schedule(name, config, steps, sigmas=None, quantize=False)
        assert default.init_noise_sigma == explicit.init_noise_sigma
        assert default.timesteps.dtype == explicit.timesteps.dtype
        for a, b in zip(_leaves(default), _leaves(explicit), strict=True):
            np.testing.assert_array_equal(a, b)
        assert default.option("sigmas") is None and default.option("quantize") is False


def test_grids_differ_from_diffusers_and_each_other():
    grids = {grid: make_schedule("euler", SD_CONFIG, 10, sigmas=grid) for grid in ("uniform", "karras", "exponential")}
    default = make_schedule("euler", SD_CONFIG, 10)
    sigmas = [np.asarray(s.tables.sigmas) for s in [default, *grids.values()]]
    for i in range(len(sigmas)):
        for j in range(i + 1, len(sigmas)):
            assert not np.array_equal(sigmas[i], sigmas[j])
    assert samplers.make_schedule("dpmpp_2m_karras", SD_CONFIG, 10).option("use_karras_sigmas") is True
