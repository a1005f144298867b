"""conv1d and local_conv1d against float64 references: PyTorch's conv1d (independent) and
``reference.local_conv1d_ref`` (a sliding window written from the definition)."""

import itertools

import numpy as np
import pytest

import gpuconv
from gpuconv import one_dimensional
from gpuconv.device import cuda_available
from reference import local_conv1d_ref

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-12


def _torch_ref(x, w, b, stride=1, padding=0, dilation=1, groups=1):
    t = (lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)))
    return F.conv1d(t(x), t(w), t(b), stride, padding, dilation, groups).numpy()


def _close(result, ref, bound):
    result = np.asarray(result)
    assert result.shape == ref.shape
    assert float(np.max(np.abs(result - ref))) <= TOL * max(float(np.max(np.abs(bound))), 1e-300)


def _geometries():
    for s, p, d, g in itertools.product((1, 2, 3), (0, 1, 2, "same", "valid", (1,)), (1, 2),
                                        (1, 2)):
        if not (p == "same" and s != 1):
            yield s, p, d, g


def test_conv1d_matches_torch_across_the_geometry():
    rng = np.random.default_rng(0)
    for s, p, d, g in _geometries():
        x = rng.standard_normal((2, 2 * g, 11))
        w = rng.standard_normal((3 * g, 2, 3))
        b = rng.standard_normal(3 * g)
        y = gpuconv.conv1d(x, w, b, (s,) if s == 3 else s, p, d, g, device="cpu")
        _close(y, _torch_ref(x, w, b, s, p, d, g), _torch_ref(abs(x), abs(w), abs(b), s, p, d, g))


DEVICE_CASES = [(1, 0, 1, 1), (2, 1, 1, 2), (1, "same", 2, 1), (3, 2, 2, 1)]


@pytest.mark.parametrize("geometry", DEVICE_CASES)
def test_conv1d_on_each_device(device, geometry):
    s, p, d, g = geometry
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal((1, 2 * g, 9)), rng.standard_normal((2 * g, 2, 3)),
               rng.standard_normal(2 * g))
    y = gpuconv.conv1d(x, w, b, s, p, d, g, device=device)
    _close(y, _torch_ref(x, w, b, s, p, d, g), _torch_ref(abs(x), abs(w), abs(b), s, p, d, g))
    y0 = gpuconv.conv1d(x[0], w, b, s, p, d, g, device=device)  # unbatched
    _close(y0, _torch_ref(x, w, b, s, p, d, g)[0], _torch_ref(abs(x), abs(w), abs(b), s, p, d, g))


@pytest.mark.parametrize("geometry", DEVICE_CASES)
@pytest.mark.parametrize("bias_kind", ["none", "map", "position"])
def test_local_conv1d_matches_the_reference(device, geometry, bias_kind):
    s, p, d, g = geometry
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1 if device == "cuda" else 2, 2 * g, 9))
    out_length = _torch_ref(x, np.zeros((2 * g, 2, 3)), None, s, p, d, g).shape[-1]
    w = rng.standard_normal((2 * g, out_length, 2, 3))
    b = {"none": None, "map": rng.standard_normal(2 * g),
         "position": rng.standard_normal((2 * g, out_length))}[bias_kind]
    y = gpuconv.local_conv1d(x, w, b, s, p, d, g, device=device)
    _close(y, local_conv1d_ref(x, w, b, s, p, d, g),
           local_conv1d_ref(abs(x), abs(w), None if b is None else abs(b), s, p, d, g))


def test_tied_local_conv1d_is_conv1d():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 4, 12)), rng.standard_normal((6, 2, 3)), rng.standard_normal(6)
    tied = np.ascontiguousarray(np.broadcast_to(w[:, None], (6, 6, 2, 3)))
    y = gpuconv.local_conv1d(x, tied, b, stride=2, padding=1, groups=2, device="cpu")
    _close(y, _torch_ref(x, w, b, 2, 1, 1, 2), _torch_ref(abs(x), abs(w), abs(b), 2, 1, 1, 2))


def test_the_2d_call_gets_views_of_the_callers_arrays(monkeypatch):
    """No copies: the 2-D function receives the caller's memory, height one."""
    seen = {}

    def spy(x, weight, bias, stride, padding, dilation, groups, device):
        seen.update(x=x, weight=weight, stride=stride, padding=padding, dilation=dilation)
        return np.zeros((x.shape[0], weight.shape[0], 1, 4))

    monkeypatch.setattr(one_dimensional, "conv2d", spy)
    x = np.zeros((2, 8, 3))[:, ::2]  # strided: still no copy
    w = np.zeros((5, 4, 3))
    y = gpuconv.conv1d(x, w, padding=1, device="cpu")
    assert seen["x"].shape == (2, 4, 1, 3) and np.shares_memory(seen["x"], x)
    assert seen["weight"].shape == (5, 4, 1, 3) and np.shares_memory(seen["weight"], w)
    assert (seen["stride"], seen["padding"], seen["dilation"]) == ((1, 1), (0, 1), (1, 1))
    assert y.shape == (2, 5, 4)


def test_torch_tensors_in_tensors_out_and_the_graph_is_recorded():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((2, 3, 10))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((4, 3, 3)))
    y = gpuconv.conv1d(x, w, padding="same")
    assert isinstance(y, torch.Tensor) and y.grad_fn is not None
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    F.conv1d(xr, w, padding="same").square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, w: gpuconv.conv1d(x[0, 0], w), ValueError, r"x must be 3-D \(N, C_in, L\)"),
    (lambda x, w: gpuconv.conv1d(x, w[..., None]), ValueError,
     r"weight must be 3-D \(C_out, C_in/groups, k\)"),
    (lambda x, w: gpuconv.conv1d(x, w, stride=(1, 1)), TypeError,
     "stride must be an int or a 1-tuple"),
    (lambda x, w: gpuconv.conv1d(x, w, stride=2, padding="same"), ValueError,
     "padding='same' requires stride 1, got stride=2"),
    (lambda x, w: gpuconv.conv1d(x, w, padding="full"), ValueError,
     "padding must be an int, a 1-tuple, 'valid' or 'same'"),
    (lambda x, w: gpuconv.conv1d(x, w, padding=((1, 2),)), TypeError, "padding must be an int"),
    (lambda x, w: gpuconv.conv1d(x, w, groups=2), ValueError,
     "groups=2 must divide the input channels C_in=3"),
    (lambda x, w: gpuconv.conv1d(x, w[:, :2]), ValueError, r"weight has C_in/groups=2 but x has C_in=3"),
    (lambda x, w: gpuconv.conv1d(x, np.zeros((4, 3, 9))), ValueError,
     "kernel does not fit in the padded input: L=5"),
    (lambda x, w: gpuconv.conv1d(x, w, np.zeros(3)), ValueError, r"bias must have shape \(4,\)"),
    (lambda x, w: gpuconv.conv1d(x, w.astype(np.float32)), TypeError,
     "weight must have the dtype of x"),
    (lambda x, w: gpuconv.local_conv1d(x, np.zeros((4, 2, 3, 3))), ValueError,
     r"weight holds kernels for L_out=2 but x of L=5 with this stride/padding/dilation gives "
     r"L_out=3 \(weight must be \(C_out, L_out, C_in/groups, k\) = \(4, 3, 3, 3\)\)"),
    (lambda x, w: gpuconv.local_conv1d(x, np.zeros((4, 3, 3, 3)), np.zeros((4, 5))), ValueError,
     r"bias must have shape \(4,\) or \(4, 3\)"),
])
def test_bad_input_is_refused_in_1d_terms(call, error, match):
    x, w = np.zeros((2, 3, 5)), np.zeros((4, 3, 3))
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs CUDA (a GPU or the simulator)")
@pytest.mark.parametrize("local", [False, True])
def test_numba_device_arrays_in_device_array_out(local):
    from numba import cuda

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 7))
    if local:
        w, b = rng.standard_normal((3, 7, 2, 3)), rng.standard_normal((3, 7))
        ref, fn = local_conv1d_ref(x, w, b, 1, "same"), gpuconv.local_conv1d
    else:
        w, b = rng.standard_normal((3, 2, 3)), rng.standard_normal(3)
        ref, fn = _torch_ref(x, w, b, 1, "same"), gpuconv.conv1d
    y = fn(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), padding="same")
    assert not isinstance(y, np.ndarray) and tuple(y.shape) == ref.shape
    np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-12, atol=1e-12)


def test_conv1d_speed_script_runs_and_checks_its_pairs():
    # scripts/conv1d_speed.py times each 1-D call beside the 2-D call of the same shape; it
    # first checks that the two agree, so a wrong pairing fails here, not in a table.
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "conv1d_speed.py"
    spec = importlib.util.spec_from_file_location("conv1d_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shapes = [("tiny-same", 2, 3, 4, 9, 3, 1, "same"), ("tiny-strided", 1, 2, 2, 11, 3, 2, 1)]
    results = script.measure(shapes, rounds=1, burst=1)
    assert [(r["shape"], r["op"]) for r in results] == [
        ("tiny-same", "conv1d"), ("tiny-same", "local_conv1d"),
        ("tiny-strided", "conv1d"), ("tiny-strided", "local_conv1d")]
    assert all(r["ratio"] > 0 for r in results)
