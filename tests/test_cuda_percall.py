"""The per-call path on device arrays: cached plans, the cheap free-memory check, the step
timer (real GPU or simulator)."""

import numpy as np
import pytest

import gpuconv
from gpuconv import conv as _conv
from gpuconv.device import cuda_available
from reference import conv2d_ref, local_conv2d_ref

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="needs CUDA (a GPU or the simulator); "
                                 "tests/test_cuda_sim.py runs these in the simulator")]


@pytest.fixture(autouse=True)
def empty_cache():
    _conv.clear_call_cache()
    yield
    _conv.clear_call_cache()


def _arrays(local):
    from numba import cuda

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 3, 3, 2, 3, 3) if local else (3, 2, 3, 3))
    b = rng.standard_normal(3)
    return (x, w, b), tuple(cuda.to_device(a) for a in (x, w, b))


@pytest.mark.parametrize("local", [False, True])
def test_repeated_device_calls_use_one_plan_and_stay_exact(local):
    (x, w, b), (dx, dw, db) = _arrays(local)
    fn = gpuconv.local_conv2d if local else gpuconv.conv2d
    ref = (local_conv2d_ref if local else conv2d_ref)(x, w, b)
    for _ in range(3):
        y = fn(dx, dw, db)
        np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-12, atol=1e-12)
    assert len(_conv._PLANS) == 1
    plan = next(iter(_conv._PLANS.values()))
    assert plan.target == "cuda" and plan.device_plan.configs  # the launch configuration kept


def test_free_memory_is_asked_once_for_small_calls_and_still_refuses(monkeypatch):
    from gpuconv.cuda import launch

    asked = []

    def free(template=None):
        asked.append(template)
        return 1 << 40

    monkeypatch.setattr(launch, "_free_bytes", free)
    _, (dx, dw, db) = _arrays(False)
    for _ in range(3):
        gpuconv.conv2d(dx, dw, db)
    assert len(asked) == 1  # the call needs far less than an eighth of what was free
    monkeypatch.setattr(launch, "_free_bytes", lambda template=None: 100)
    launch.clear_caches()
    with pytest.raises(gpuconv.InsufficientMemoryError, match="only 100 B is free"):
        gpuconv.conv2d(dx, dw, db)


def test_call_steps_times_each_step_of_a_device_call():
    from gpuconv.bench.percall import call_steps

    _, (dx, dw, db) = _arrays(False)
    result = call_steps("conv2d", dx, dw, db, repeat=3, warmup=1)
    assert {"operands", "lookup", "check", "allocate", "launch", "sync"} <= set(result["steps_us"])
    assert all(v >= 0 for v in result["steps_us"].values()) and result["total_us"] > 0


def test_strided_device_operand_after_a_contiguous_one():
    from numba import cuda

    (x, w, b), (dx, dw, db) = _arrays(False)
    gpuconv.conv2d(dx, dw, db)
    wide = np.zeros((2, 2, 5, 10))
    wide[..., ::2] = x
    strided = cuda.to_device(wide)[..., ::2]
    y = gpuconv.conv2d(strided, dw, db)
    assert len(_conv._PLANS) == 2
    np.testing.assert_allclose(y.copy_to_host(), conv2d_ref(x, w, b), rtol=1e-12, atol=1e-12)


def test_an_operand_from_another_stream_is_waited_for_on_the_device(monkeypatch):
    """An operand whose producer's stream is not the call's (a PyTorch tensor written on a
    side stream beside a CuPy or Numba first operand: PyTorch exports no stream in the array
    interface) is ordered by an event recorded on the producer's stream and waited for on
    the call's; operands on the call's stream, or sharing the first one's, are not."""
    from gpuconv.cuda import launch

    class Operand:
        def __init__(self, name):
            self.obj, self.cai = name, None

    streams = {"x": "call", "w": "side", "b": "call"}
    events = []

    class Event:
        def record(self, stream):
            events.append(("record", stream))

        def wait(self, stream):
            events.append(("wait", stream))

    monkeypatch.setattr(launch, "_stream_of", lambda obj, device, cai: streams[obj])
    monkeypatch.setattr(launch, "_same_stream", lambda a, b: a == b)
    monkeypatch.setattr(launch, "_as_device_array", lambda obj, sync, cai: (obj, sync))
    monkeypatch.setattr(launch, "simulator_enabled", lambda: False)
    monkeypatch.setattr(launch.cuda, "event", lambda timing=True: Event())
    x, w, b = Operand("x"), Operand("w"), Operand("b")
    arrays = launch._operand_arrays([x, w, b, None], (False,) * 4, x, "call", 0)
    assert arrays == [("x", False), ("w", True), ("b", False), None]
    assert events == [("record", "side"), ("wait", "call")]
    events.clear()  # the same operand known to share the first one's stream: no event
    launch._operand_arrays([x, w, b], (False, True, False), x, "call", 0)
    assert events == []


def test_calls_on_host_arrays_reuse_one_stream_per_thread(monkeypatch):
    """Calls on NumPy arrays queue on one stream (each waits for it before it returns): no
    stream is made per call; another thread gets its own. The results exact."""
    import threading

    from gpuconv.cuda import launch

    (x, w, b), _ = _arrays(False)
    first = launch._host_stream()
    made = []
    real = launch.cuda.stream
    monkeypatch.setattr(launch.cuda, "stream", lambda: made.append(1) or real())
    for _ in range(2):
        y = gpuconv.conv2d(x, w, b, device="cuda")
        np.testing.assert_allclose(y, conv2d_ref(x, w, b), rtol=1e-12, atol=1e-12)
        assert launch._host_stream() is first
    assert made == []
    other = []
    thread = threading.Thread(target=lambda: other.append(launch._host_stream()))
    thread.start()
    thread.join()
    assert other[0] is not first
