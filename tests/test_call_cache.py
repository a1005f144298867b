"""The call cache of the public layer: a cached call gives what an uncached one gives, the
same results and the same errors, and a cached entry never lets bad input through."""

import numpy as np
import pytest

import gpuconv
from gpuconv import conv as _conv
from gpuconv import grad as _grad
from gpuconv.device import FreeMemory, InsufficientMemoryError

from reference import conv2d_ref as conv2d_reference, local_conv2d_ref as local_conv2d_reference


@pytest.fixture(autouse=True)
def empty_cache():
    _conv.clear_call_cache()
    yield
    _conv.clear_call_cache()


def _good(local, dtype=np.float64):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    w = rng.standard_normal((4, 4, 4, 3, 3, 3) if local else (4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    return x, w, b


def _outcome(fn, *args, **kwargs):
    """(result, None) or (None, (exception type, message))."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return None, (type(exc), str(exc))


@pytest.mark.parametrize("local", [False, True])
def test_cached_results_equal_uncached_and_the_reference(local):
    x, w, b = _good(local)
    fn = gpuconv.local_conv2d if local else gpuconv.conv2d
    first = fn(x, w, b, padding=0, device="cpu")
    assert len(_conv._PLANS) == 1
    second = fn(x, w, b, padding=0, device="cpu")  # from the cache
    assert len(_conv._PLANS) == 1
    ref = (local_conv2d_reference if local else conv2d_reference)(x, w, b)
    np.testing.assert_allclose(first, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(first, second)
    # new values, same key: the plan is reused, the result follows the values
    x2 = x[::-1].copy()
    third = fn(x2, w, b, device="cpu")
    assert len(_conv._PLANS) == 1
    np.testing.assert_allclose(third, (local_conv2d_reference if local else conv2d_reference)(
        x2, w, b), rtol=1e-12, atol=1e-12)


def _bad_calls(local):
    """Calls that must fail, each a variation of the good call in one respect that the key
    must tell apart (values equal in Python, like 1 == True == 1.0, included)."""
    x, w, b = _good(local)
    w_other = np.zeros((4, 5, 5, 3, 3, 3) if local else (4, 2, 3, 3))
    calls = [
        ("stride=True", (x, w, b), dict(stride=True)),
        ("stride=1.0", (x, w, b), dict(stride=1.0)),
        ("padding=False", (x, w, b), dict(padding=False)),
        ("padding=0.0", (x, w, b), dict(padding=0.0)),
        ("padding=(0, 0.0)", (x, w, b), dict(padding=(0, 0.0))),
        ("dilation=(1, True)", (x, w, b), dict(dilation=(1, True))),
        ("groups=True", (x, w, b), dict(groups=True)),
        ("groups=1.0", (x, w, b), dict(groups=1.0)),
        ("groups=np.float64", (x, w, b), dict(groups=np.float64(1))),
        ("float32 weight", (x, w.astype(np.float32), b), {}),
        ("int x", (x.astype(np.int64), w, b), {}),
        ("bias shape", (x, w, np.zeros(5)), {}),
        ("bias dtype", (x, w, b.astype(np.float32)), {}),
        ("weight shape", (x, w_other, b), {}),
        ("x 5-D", (x[None], w, b), {}),
        ("x channels", (np.zeros((2, 2, 6, 6)), w, b), {}),
        ("channels-last x", (np.zeros((2, 6, 6, 3)), w, b), {}),
        ("kernel larger than x", (np.zeros((2, 3, 2, 2)), w, b), {}),
        ("device", (x, w, b), dict(device="gpu")),
        ("device list", (x, w, b), dict(device=["cpu"])),
        ("x as a list", (x.tolist(), w.astype(np.float32), b), {}),
        ("weight None", (x, None, b), {}),
    ]
    if local:  # the weights are tied to the output size
        calls += [("x larger", (np.zeros((2, 3, 7, 7)), w, b), {}),
                  ("padding 1", (x, w, b), dict(padding=1)),
                  ("stride 2", (x, w, b), dict(stride=2))]
    else:
        calls += [("padding 'same' with stride 2", (x, w, b), dict(padding="same", stride=2))]
    return calls


@pytest.mark.parametrize("local", [False, True])
def test_bad_input_after_a_good_call_raises_what_it_raises_uncached(local):
    """Each bad call is run uncached (empty cache), then again right after the good call
    with the same shapes has been cached, and once more after itself: same exception type
    and message every time."""
    x, w, b = _good(local)
    fn = gpuconv.local_conv2d if local else gpuconv.conv2d
    for label, args, kwargs in _bad_calls(local):
        kwargs = dict({"device": "cpu"}, **kwargs)
        _conv.clear_call_cache()
        _, uncached = _outcome(fn, *args, **kwargs)
        assert uncached is not None, f"{label}: did not raise"
        assert uncached[0] in (TypeError, ValueError) or issubclass(uncached[0], ValueError), label
        good, error = _outcome(fn, x, w, b, device="cpu")
        assert error is None and good is not None
        _, after_good = _outcome(fn, *args, **kwargs)
        _, again = _outcome(fn, *args, **kwargs)
        assert after_good == uncached, label
        assert again == uncached, label


def test_unbatched_and_batched_calls_do_not_share_a_plan():
    x, w, b = _good(False)
    y3 = gpuconv.conv2d(x[0], w, b, device="cpu")
    y4 = gpuconv.conv2d(x[:1], w, b, device="cpu")
    assert y3.shape == (4, 4, 4) and y4.shape == (1, 4, 4, 4)
    np.testing.assert_array_equal(y3, y4[0])
    # a 3-D grad_output beside a 4-D input (unbatched rule) still fails after good calls
    with pytest.raises(ValueError, match="must be 3-D"):
        _grad.conv2d_input((3, 6, 6), w, np.zeros((1, 4, 4, 4)), device="cpu")


def test_gradient_sizes_are_part_of_the_key():
    """Sizes equal in Python but given differently (3.0, True for 1) give what they give
    uncached: accepted ones the same result, refused ones the same error."""
    x, w, _ = _good(False)
    gy = np.ones((2, 4, 4, 4))
    good = _grad.conv2d_weight(x, (4, 3, 3, 3), gy, device="cpu")
    assert good.shape == (4, 3, 3, 3)
    refused = 0
    for bad in ((4, 3, 3, 3.0), (4, 3, 3.5, 3), (4, 3, 3, True), [4, 3, 3, 2], "4333",
                (4, 3, 3), (4, 3, 3, -3)):
        _conv.clear_call_cache()
        result, uncached = _outcome(_grad.conv2d_weight, x, bad, gy, device="cpu")
        _grad.conv2d_weight(x, (4, 3, 3, 3), gy, device="cpu")
        cached_result, cached = _outcome(_grad.conv2d_weight, x, bad, gy, device="cpu")
        assert cached == uncached, bad
        if uncached is None:
            np.testing.assert_array_equal(cached_result, result)
        refused += uncached is not None
    assert refused >= 5


def test_strided_input_gets_its_own_plan_and_the_right_result():
    x, w, b = _good(False)
    wide = np.zeros((2, 3, 6, 12))
    wide[..., ::2] = x
    strided = wide[..., ::2]
    assert not strided.flags.c_contiguous
    a = gpuconv.conv2d(x, w, b, device="cpu")
    c = gpuconv.conv2d(strided, w, b, device="cpu")
    assert len(_conv._PLANS) == 2
    np.testing.assert_array_equal(a, c)


def test_environment_device_is_part_of_the_key(monkeypatch):
    x, w, b = _good(False)
    gpuconv.conv2d(x, w, b, device="auto")
    monkeypatch.setenv("GPUCONV_DEVICE", "tpu")
    with pytest.raises(ValueError, match="GPUCONV_DEVICE"):
        gpuconv.conv2d(x, w, b, device="auto")


def test_cache_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(_conv, "CALL_CACHE_SIZE", 3)
    w = np.ones((1, 1, 2, 2))
    for size in (3, 4, 5):
        gpuconv.conv2d(np.ones((1, 1, size, size)), w, device="cpu")
    gpuconv.conv2d(np.ones((1, 1, 3, 3)), w, device="cpu")  # used again: most recent
    gpuconv.conv2d(np.ones((1, 1, 6, 6)), w, device="cpu")  # evicts size 4
    sizes = [key[1][2][2] for key in _conv._PLANS]
    assert sizes == [5, 3, 6]


def test_free_memory_is_asked_again_only_for_a_noticeable_share():
    asked = []

    def query():
        asked.append(1)
        return 1000

    gauge = FreeMemory(query, "test")
    gauge.check(100)  # asked: 1000 free, 900 left for the next call
    gauge.check(100)  # an eighth of 900 or less: not asked again (800 left)
    gauge.check(100)  # an eighth of 800: not asked again (700 left)
    assert len(asked) == 1
    gauge.check(88)   # more than an eighth of 700: asked again
    assert len(asked) == 2
    with pytest.raises(InsufficientMemoryError, match="needs about 1001 B of test memory but "
                                                      "only 1000 B is free"):
        gauge.check(1001)
    assert len(asked) == 3
    gauge._when -= 2 * FreeMemory.MAX_AGE_S  # an old reading is refreshed
    gauge.check(1)
    assert len(asked) == 4


def test_free_memory_refuses_once_earlier_calls_used_it_up():
    """Calls that keep their outputs, each under an eighth of what was free, run the
    reading down until the driver is asked again: the call that no longer fits is refused,
    not left to the allocator's own error."""
    state = {"free": 1000}
    gauge = FreeMemory(lambda: state["free"], "test")
    with pytest.raises(InsufficientMemoryError, match="needs about 100 B of test memory"):
        for _ in range(12):
            gauge.check(100)
            state["free"] -= 100  # the call's output is kept
    assert state["free"] == 0


def test_host_memory_check_still_refuses_a_call_that_does_not_fit(monkeypatch):
    x, w, b = _good(False)
    gpuconv.conv2d(x, w, b, device="cpu")  # cached, with a real reading of free memory
    monkeypatch.setattr(_conv, "host_memory_available", lambda: 1000)
    _conv._HOST_MEMORY.clear()
    with pytest.raises(InsufficientMemoryError, match="of host memory but only 1000 B"):
        gpuconv.conv2d(x, w, b, device="cpu")


def test_small_calls_run_on_the_callers_thread(monkeypatch):
    """Below the crossover the kernel runs with one Numba thread; above it with all."""
    import numba

    from gpuconv.cpu import threads

    seen = []
    real = threads.on_caller_thread

    def spy(kernel, *args):
        seen.append("caller")
        return real(kernel, *args)

    monkeypatch.setattr(threads, "on_caller_thread", spy)
    monkeypatch.setattr("gpuconv.cpu.on_caller_thread", spy)
    x, w, b = _good(False)
    assert threads.runs_on_caller_thread("conv2d", _conv._plan_for(
        gpuconv.ops.OPS["conv2d"], {"x": x, "weight": w, "bias": b},
        [_conv._operand(v, n) for n, v in (("x", x), ("weight", w), ("bias", b))], {}, 1, 0,
        1, 1, "cpu").geom)
    y = gpuconv.conv2d(x, w, b, device="cpu")
    assert seen == ["caller"]
    np.testing.assert_allclose(y, conv2d_reference(x, w, b), rtol=1e-12, atol=1e-12)
    monkeypatch.setitem(threads.SERIAL_FLOPS, "conv2d", 0)
    _conv.clear_call_cache()
    gpuconv.conv2d(x, w, b, device="cpu")
    assert seen == ["caller"]
    assert numba.get_num_threads() >= 1


def test_thread_count_is_part_of_the_key():
    """The CPU kernels' scratch (checked against free memory) grows with the threads."""
    import numba

    x, w, b = _good(False)
    threads = numba.get_num_threads()
    gpuconv.conv2d(x, w, b, device="cpu")
    try:
        numba.set_num_threads(1)
        gpuconv.conv2d(x, w, b, device="cpu")
    finally:
        numba.set_num_threads(threads)
    assert len(_conv._PLANS) == (2 if threads > 1 else 1)


def test_a_tensors_shape_as_a_size_is_cached():
    """``torch.Size`` (what ``tensor.shape`` is) as ``input_size`` / ``weight_size``: a tuple
    of ints, looked up like one; the key still tells it from a list of the same ints."""
    torch = pytest.importorskip("torch")
    x, w, _ = _good(False)
    gy = np.random.default_rng(2).standard_normal((2, 4, 4, 4))
    tx, tw, tgy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(gy)
    gx = _grad.conv2d_input(tx.shape, tw, tgy)
    gw = _grad.conv2d_weight(tx, tw.shape, tgy)
    assert len(_conv._PLANS) == 2
    np.testing.assert_array_equal(_grad.conv2d_input(tx.shape, tw, tgy).numpy(), gx.numpy())
    np.testing.assert_array_equal(_grad.conv2d_weight(tx, tw.shape, tgy).numpy(), gw.numpy())
    assert len(_conv._PLANS) == 2
    _grad.conv2d_input(list(tx.shape), tw, tgy)
    assert len(_conv._PLANS) == 3
