"""Autotuning: the CUDA forward kernel chosen by measurement (gpuconv.set_autotune).

The timer is replaced where the choice matters (the simulator's clock says nothing about a
GPU), so each test knows which candidate must win; every result is checked against the
float64 reference."""

import numpy as np
import pytest

import gpuconv
from gpuconv import conv as _conv
from gpuconv import device as _device
from gpuconv.device import cuda_available
from gpuconv.geometry import conv_geometry
from reference import conv2d_ref, local_conv2d_ref


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Autotuning off and nothing chosen, before and after each test."""
    monkeypatch.delenv("GPUCONV_AUTOTUNE", raising=False)
    monkeypatch.setattr(_device, "_AUTOTUNE", [])
    _conv.clear_call_cache()
    if cuda_available():
        from gpuconv.cuda import autotune

        autotune.forget()
    yield
    _conv.clear_call_cache()
    if cuda_available():
        autotune.forget()


def test_set_autotune_returns_the_previous_setting_and_takes_only_booleans():
    assert _device.autotune_enabled() is False  # off unless asked for
    assert gpuconv.set_autotune(True) is False
    assert _device.autotune_enabled() is True
    assert gpuconv.set_autotune(False) is True
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="enabled must be True or False"):
            gpuconv.set_autotune(bad)
    assert _device.autotune_enabled() is False


@pytest.mark.parametrize("value, expected", [("1", True), (" On ", True), ("true", True),
                                             ("0", False), ("off", False), ("", False)])
def test_the_environment_variable_sets_the_default(monkeypatch, value, expected):
    monkeypatch.setenv("GPUCONV_AUTOTUNE", value)
    assert _device.autotune_enabled() is expected


def test_an_unknown_environment_value_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("GPUCONV_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="GPUCONV_AUTOTUNE must be 1 or 0.*'fast'"):
        _device.autotune_enabled()
    with pytest.raises(ValueError, match="GPUCONV_AUTOTUNE"):
        gpuconv.set_autotune(True)  # it reads the setting it replaces


def test_eligible_leaves_out_candidates_that_need_more_scratch_than_the_pick():
    pytest.importorskip("numba.cuda")
    from gpuconv.cuda import autotune

    need = {"pick": 10, "less": 1, "same": 10, "more": 11}
    scratch = lambda config, geom, dtype: need[config]  # noqa: E731
    assert autotune.eligible(["less", "pick", "more", "same"], "pick", None, None,
                             scratch) == ["less", "pick", "same"]


# ------------------------------------------------------------------ calls on device arrays

needs_cuda = pytest.mark.skipif(not cuda_available(),
                                reason="needs CUDA (a GPU or the simulator)")


def _device_arrays(local, dtype=np.float64):
    from numba import cuda

    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 6, 5)).astype(dtype)
    w = rng.standard_normal((4, 5, 4, 2, 2, 2) if local else (4, 2, 2, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    return (x, w, b), tuple(cuda.to_device(a) for a in (x, w, b))


def _fake_timer(rank):
    """A timer that ranks the candidates by ``rank(kernel name)`` and counts its calls, by
    running each launch once (so a candidate that fails still fails)."""
    timed = []

    def measure(run, stream):
        run()
        name = run.__defaults__[0].kernel.name
        timed.append(name)
        return rank(name)

    return measure, timed


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("local", [False, True])
def test_an_autotuned_call_runs_the_fastest_candidate_and_stays_exact(monkeypatch, local):
    """Two groups, so every candidate's group indexing is exercised."""
    from gpuconv.cuda import autotune, kernels

    (x, w, b), (dx, dw, db) = _device_arrays(local)
    fn, ref = (gpuconv.local_conv2d, local_conv2d_ref) if local else (gpuconv.conv2d,
                                                                       conv2d_ref)
    op = "local_conv2d" if local else "conv2d"
    geom = conv_geometry(x.shape, (2, 2), 4, groups=2)
    candidates = kernels.forward_candidates(op, geom, np.float64)
    pick = (kernels.local_conv2d_forward_config if local else kernels.conv2d_config)(
        geom, np.float64)
    winner = [c for c in candidates if c != pick][-1].kernel.name  # not the dispatcher's
    measure, timed = _fake_timer(lambda name: 0.0 if name == winner else 1.0)
    monkeypatch.setattr(autotune, "_measure", measure)

    expected = ref(x, w, b, groups=2)
    assert gpuconv.set_autotune(True) is False
    for _ in range(3):
        y = fn(dx, dw, db, groups=2).copy_to_host()
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert sorted(timed) == sorted(c.kernel.name for c in candidates)  # once each, once
    assert list(autotune.choices().values()) == [winner]
    (key,) = autotune.choices()
    assert key[:3] == (op, geom, "float64")
    # a new plan for the same key takes the stored choice without measuring again
    _conv.clear_call_cache()
    np.testing.assert_allclose(fn(dx, dw, db, groups=2).copy_to_host(), expected, rtol=1e-12,
                               atol=1e-12)
    assert len(timed) == len(candidates)
    # forgotten: the cached plan's next call measures again
    autotune.forget()
    np.testing.assert_allclose(fn(dx, dw, db, groups=2).copy_to_host(), expected, rtol=1e-12,
                               atol=1e-12)
    assert len(timed) == 2 * len(candidates)
    assert list(autotune.choices().values()) == [winner]
    # autotuning off: the dispatcher's pick again, nothing measured
    gpuconv.set_autotune(False)
    plan = next(iter(_conv._PLANS.values())).device_plan
    (gpu,) = plan.tuned
    assert plan.tuned[gpu][1].kernel.name == winner
    assert plan.tuned_for(None, None, None, geom, None, None, gpu) == pick
    np.testing.assert_allclose(fn(dx, dw, db, groups=2).copy_to_host(), expected, rtol=1e-12,
                               atol=1e-12)
    assert len(timed) == 2 * len(candidates)


@pytest.mark.cuda
@needs_cuda
def test_a_failing_candidate_is_left_out_and_a_failing_pick_is_raised(monkeypatch):
    from gpuconv.cuda import autotune, kernels

    (x, w, b), (dx, dw, db) = _device_arrays(False)
    geom = conv_geometry(x.shape, (2, 2), 4, groups=2)
    pick = kernels.conv2d_config(geom, np.float64).kernel.name
    others = [c.kernel.name for c in kernels.forward_candidates("conv2d", geom, np.float64)
              if c.kernel.name != pick]

    def measure(run, stream):
        name = run.__defaults__[0].kernel.name
        if name == others[0]:
            raise RuntimeError("launch failed")
        run()
        return 0.0 if name == pick else 1.0

    monkeypatch.setattr(autotune, "_measure", measure)
    gpuconv.set_autotune(True)
    np.testing.assert_allclose(gpuconv.conv2d(dx, dw, db, groups=2).copy_to_host(),
                               conv2d_ref(x, w, b, groups=2), rtol=1e-12, atol=1e-12)
    assert list(autotune.choices().values()) == [pick]

    autotune.forget()
    _conv.clear_call_cache()

    def broken_pick(run, stream):
        if run.__defaults__[0].kernel.name == pick:
            raise RuntimeError("the pick failed")
        return 0.0

    monkeypatch.setattr(autotune, "_measure", broken_pick)
    with pytest.raises(RuntimeError, match="the pick failed"):
        gpuconv.conv2d(dx, dw, db, groups=2)
    assert autotune.choices() == {}


@pytest.mark.cuda
@needs_cuda
def test_the_dispatchers_pick_is_timed_even_when_no_candidate_lists_it(monkeypatch):
    from gpuconv.cuda import autotune, kernels

    (x, w, b), (dx, dw, db) = _device_arrays(False)
    geom = conv_geometry(x.shape, (2, 2), 4, groups=2)
    pick = kernels.conv2d_config(geom, np.float64).kernel.name
    monkeypatch.setattr(kernels, "forward_candidates", lambda *args: [])
    measure, timed = _fake_timer(lambda name: 1.0)
    monkeypatch.setattr(autotune, "_measure", measure)
    gpuconv.set_autotune(True)
    np.testing.assert_allclose(gpuconv.conv2d(dx, dw, db, groups=2).copy_to_host(),
                               conv2d_ref(x, w, b, groups=2), rtol=1e-12, atol=1e-12)
    assert timed == [pick] and list(autotune.choices().values()) == [pick]
