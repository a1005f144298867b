"""Odd but valid input, absurd sizes, concurrency, and the 2**31 index boundary."""

import os
import threading
import time

import numpy as np
import pytest

import gpuconv
from gpuconv.ops import OPS
from gpuconv import InsufficientMemoryError, conv2d, local_conv2d
from gpuconv.device import host_memory_available
from reference import conv2d_ref, local_conv2d_ref


def test_one_by_one_images(device):
    x = np.full((3, 2, 1, 1), 2.0)
    w = np.full((4, 2, 1, 1), 0.5)
    np.testing.assert_array_equal(conv2d(x, w, device=device), np.full((3, 4, 1, 1), 2.0))
    wl = np.full((4, 1, 1, 2, 1, 1), 0.5)
    np.testing.assert_array_equal(local_conv2d(x, wl, device=device), np.full((3, 4, 1, 1), 2.0))


def test_huge_channel_count_tiny_image(device):
    rng = np.random.default_rng(0)
    c_in = 64 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 2048
    x = rng.standard_normal((1, c_in, 2, 2))
    w = rng.standard_normal((3, c_in, 2, 2))
    np.testing.assert_allclose(conv2d(x, w, device=device), conv2d_ref(x, w), rtol=1e-11, atol=1e-11)


def test_float32_near_overflow_stays_finite_and_right(device):
    big = np.float32(1e38)
    x = np.full((1, 1, 3, 3), big, dtype=np.float32)
    w = np.array([[[[1.0, -1.0, 1.0]] * 3]], dtype=np.float32).reshape(1, 1, 3, 3) / np.float32(3)
    y = conv2d(x, w, device=device)  # terms of +-3.3e37 summed: no intermediate beyond FLT_MAX
    ref = conv2d_ref(x, w)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    # and a true overflow is an honest +inf, not garbage
    y = conv2d(x, np.ones((1, 1, 3, 3), np.float32), device=device)
    assert np.isposinf(y).all()


def test_result_never_aliases_an_input(device):
    x = np.ones((1, 1, 1, 1))
    w = np.ones((1, 1, 1, 1))
    y = conv2d(x, w, device=device)
    assert not np.shares_memory(y, x) and not np.shares_memory(y, w)


def test_absurd_output_is_refused_before_allocating():
    # A 0-strided weight costs no memory but claims 2**40 output channels.
    x = np.ones((1, 1, 4, 4), np.float32)
    w = np.broadcast_to(np.float32(1), (2**40, 1, 1, 1))
    with pytest.raises(InsufficientMemoryError) as info:
        conv2d(x, w, device="cpu")
    message = str(info.value)
    assert "needs about" in message and "free" in message
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ValueError)


CONCURRENCY = dict(threads=4, calls_per_thread=12)


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_concurrent_calls_match_serial_calls(op, device, record_property):
    """Several threads calling at once (first use included) get exactly the serial results."""
    rng = np.random.default_rng(1)
    small = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    shape = (1, 2, 5, 5) if small else (2, 8, 24, 24)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    fn = getattr(gpuconv, op)
    k = 3
    out_hw = shape[2] - k + 1
    wshape = (4, out_hw, out_hw, shape[1], k, k) if op == "local_conv2d" else (4, shape[1], k, k)
    w = rng.standard_normal(wshape).astype(np.float32)
    threads, calls = CONCURRENCY["threads"], CONCURRENCY["calls_per_thread"]
    if small:
        threads, calls = 2, 2
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(tid):
        try:
            barrier.wait()
            for i in range(calls):
                j = (tid + i) % len(xs)
                results[(tid, i)] = (j, fn(xs[j], w, device=device))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    assert not errors, errors
    serial = [fn(x, w, device=device) for x in xs]
    mismatches = sum(not np.array_equal(y, serial[j]) for j, y in results.values())
    record_property("concurrency", f"{threads} threads x {calls} calls, {mismatches} mismatches, {elapsed:.2f} s")
    print(f"\n{op} on {device}: {threads} threads x {calls} calls in {elapsed:.2f} s, "
          f"{mismatches} results differ from serial calls")
    assert len(results) == threads * calls and mismatches == 0
    ref = (local_conv2d_ref if op == "local_conv2d" else conv2d_ref)(xs[0], w)
    np.testing.assert_allclose(serial[0], ref, rtol=1e-4, atol=1e-4)


def _enough_memory(gib):
    available = host_memory_available()
    return available is not None and available > gib * 2**30


@pytest.mark.skipif(not _enough_memory(14), reason="needs about 10 GiB of free host memory")
def test_flat_indices_past_two_to_the_31_on_the_cpu():
    """An output with more than 2**31 elements is computed right at its far end."""
    c_out, h, w = 2**15 + 4, 256, 256          # 2**31 + 2**18 output elements
    x = np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w) % 7 - 3
    weight = (np.arange(c_out, dtype=np.float32) % 5 - 2).reshape(c_out, 1, 1, 1)
    y = conv2d(x, weight, device="cpu")
    assert y.size > 2**31
    flat = y.reshape(-1)
    for index in (2**31 - 1, 2**31, 2**31 + 1, y.size - 1):
        o, rest = divmod(index, h * w)
        assert flat[index] == weight[o, 0, 0, 0] * x[0, 0].reshape(-1)[rest]
    del y, flat


@pytest.mark.parametrize("op", ["conv2d", "local_conv2d"])
def test_memory_check_counts_the_kernels_scratch(op, monkeypatch):
    """Scratch (the repacked, padded input) is counted, not only the output."""
    import tracemalloc

    from gpuconv import conv as _conv

    x = np.ones((2, 64, 24, 24), np.float32)
    w = np.ones((1, 24, 24, 64, 3, 3) if op == "local_conv2d" else (1, 64, 3, 3), np.float32)
    fn = getattr(gpuconv, op)
    kwargs = dict(padding=1, device="cpu")
    fn(x, w, **kwargs)  # compiled, caches warm
    tracemalloc.start()
    fn(x, w, **kwargs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    x_op, w_op = _conv._operand(x, "x"), _conv._operand(w, "weight")
    geom = gpuconv.geometry.conv_geometry(x.shape, (3, 3), 1, padding=1)
    assert _conv._host_bytes_needed(OPS[op], [x_op, w_op], geom) >= peak
    monkeypatch.setattr(_conv, "host_memory_available", lambda: peak // 2)
    _conv.clear_call_cache()  # the last reading of free memory is kept for repeated calls
    with pytest.raises(InsufficientMemoryError):
        fn(x, w, **kwargs)
