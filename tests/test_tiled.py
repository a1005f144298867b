"""tiled_conv2d and its gradients on every device present, against float64 references: the
tiled weights expanded to one kernel per output position (the slot rule written out here
again), then the independent local references of tests/reference.py. Plus the two ends of
the dial (conv2d, local_conv2d) and the argument errors.

Sizes stay tiny so the same bodies also run in the CUDA simulator.
"""

import numpy as np
import pytest

import gpuconv
from gpuconv import grad
from reference import (assert_close, conv2d_ref, local_conv2d_input_grad_ref,
                       local_conv2d_ref, local_conv2d_weight_grad_ref, output_size)
from test_conv import GEOMETRIES, GRID_DTYPES, GRID_IDS

TILINGS = ["periodic", "blocks"]


def _slot(i, tiles, size, tiling):
    """The kernel slot of output row (column) ``i``, as the issue defines it."""
    if tiling == "periodic":
        return i % tiles
    return int(np.floor(i * tiles / size))


def _slot_index(size, tiles, tiling):
    return np.array([_slot(i, tiles, size, tiling) for i in range(size)])


def _expand(w, out_hw, tiling):
    """Tiled ``(C_out, T_h, T_w, ...)`` -> local ``(C_out, H_out, W_out, ...)``, float64."""
    rows = _slot_index(out_hw[0], w.shape[1], tiling)
    cols = _slot_index(out_hw[1], w.shape[2], tiling)
    return np.asarray(w, dtype=np.float64)[:, rows][:, :, cols]


def _fold(gw_local, tiles, tiling):
    """Local weight gradient -> tiled: each slot sums its positions (float64)."""
    c_out, h_out, w_out = gw_local.shape[:3]
    out = np.zeros((c_out, *tiles) + gw_local.shape[3:])
    for i in range(h_out):
        for j in range(w_out):
            out[:, _slot(i, tiles[0], h_out, tiling), _slot(j, tiles[1], w_out, tiling)] += \
                gw_local[:, i, j]
    return out


def _host(y):
    return y.copy_to_host() if hasattr(y, "copy_to_host") else np.asarray(y)


def _problem(geometry, dtype, tiling, seed, tiles=None):
    """x, tiled weight, per-slot bias, grad_output, kwargs and the output size; random tile
    sizes between 1 and the output size unless given."""
    rng = np.random.default_rng(seed)
    _, n, c_in, h, w, c_out, k, stride, padding, dilation, groups = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    out_hw = output_size((h, w), (kh, kw), stride, padding, dilation)
    if tiles is None:
        tiles = (int(rng.integers(1, out_hw[0] + 1)), int(rng.integers(1, out_hw[1] + 1)))
    x = rng.uniform(-1, 1, (n, c_in, h, w)).astype(dtype)
    wt = rng.uniform(-1, 1, (c_out, *tiles, c_in // groups, kh, kw)).astype(dtype)
    b = rng.uniform(-1, 1, (c_out, *tiles)).astype(dtype)
    gy = rng.uniform(-1, 1, (n, c_out, *out_hw)).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, wt, b, gy, kwargs, out_hw


def _bias_expand(b, out_hw, tiling):
    return _expand(b[..., None], out_hw, tiling)[..., 0]


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("tiling", TILINGS)
def test_forward_matches_reference(tiling, geometry, dtype, device, poisoned_outputs):
    x, w, b, _, kwargs, out_hw = _problem(geometry, dtype, tiling, 1)
    y = gpuconv.tiled_conv2d(x, w, b, tiling=tiling, device=device, **kwargs)
    assert isinstance(y, np.ndarray) and y.dtype == np.dtype(dtype)
    wl, bl = _expand(w, out_hw, tiling), _bias_expand(b, out_hw, tiling)
    expected = local_conv2d_ref(x, wl, bl, **kwargs)
    bound = local_conv2d_ref(np.abs(x), np.abs(wl), np.abs(bl), **kwargs)
    assert_close(y, expected, bound, dtype, terms=w[0, 0, 0].size + 1)


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("tiling", TILINGS)
def test_input_grad_matches_reference(tiling, geometry, dtype, device):
    x, w, _, gy, kwargs, out_hw = _problem(geometry, dtype, tiling, 2)
    gx = grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs)
    assert isinstance(gx, np.ndarray) and gx.dtype == np.dtype(dtype) and gx.shape == x.shape
    wl = _expand(w, out_hw, tiling)
    expected = local_conv2d_input_grad_ref(x.shape, wl, gy, **kwargs)
    bound = local_conv2d_input_grad_ref(x.shape, np.abs(wl), np.abs(gy), **kwargs)
    assert_close(gx, expected, bound, dtype, terms=w.shape[0] * w.shape[-2] * w.shape[-1])


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=GRID_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
@pytest.mark.parametrize("tiling", TILINGS)
def test_weight_grad_matches_reference(tiling, geometry, dtype, device):
    x, w, _, gy, kwargs, out_hw = _problem(geometry, dtype, tiling, 3)
    gw = grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling, device=device, **kwargs)
    assert isinstance(gw, np.ndarray) and gw.dtype == np.dtype(dtype) and gw.shape == w.shape
    local_shape = (w.shape[0], *out_hw) + w.shape[3:]
    expected = _fold(local_conv2d_weight_grad_ref(x, local_shape, gy, **kwargs), w.shape[1:3],
                     tiling)
    bound = _fold(local_conv2d_weight_grad_ref(np.abs(x), local_shape, np.abs(gy), **kwargs),
                  w.shape[1:3], tiling)
    # float16 on the GPU: each position's gradient is rounded to float16 once before the
    # slot sum (within the tolerance of one rounding)
    assert_close(gw, expected, bound, dtype, terms=x.shape[0] * out_hw[0] * out_hw[1])


@pytest.mark.parametrize("tiling", TILINGS)
def test_gradients_are_deterministic_and_adjoint(tiling, device):
    x, w, _, gy, kwargs, _ = _problem(GEOMETRIES[1], np.float64, tiling, 4, tiles=(2, 3))
    y = gpuconv.tiled_conv2d(x, w, tiling=tiling, device=device, **kwargs)
    gx = grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs)
    gw = grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling, device=device, **kwargs)
    assert np.array_equal(gx, grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling,
                                                       device=device, **kwargs))
    assert np.array_equal(gw, grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling,
                                                        device=device, **kwargs))
    inner = np.sum(y * gy)
    assert np.isclose(inner, np.sum(x * gx), rtol=1e-12)
    assert np.isclose(inner, np.sum(w * gw), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# the ends of the dial and the slot rule
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("geometry", [GEOMETRIES[2], GEOMETRIES[6]], ids=["stride2", "groups"])
def test_one_slot_is_conv2d_bit_for_bit(geometry, tiling, device):
    x, w, _, gy, kwargs, _ = _problem(geometry, np.float32, tiling, 5, tiles=(1, 1))
    b = np.linspace(-1, 1, w.shape[0], dtype=np.float32)
    shared = w.reshape(w.shape[0], *w.shape[3:])
    y = gpuconv.tiled_conv2d(x, w, b, tiling=tiling, device=device, **kwargs)
    assert np.array_equal(y, gpuconv.conv2d(x, shared, b, device=device, **kwargs))
    assert np.array_equal(
        grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs),
        grad.conv2d_input(x.shape, shared, gy, device=device, **kwargs))
    assert np.array_equal(
        grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling, device=device, **kwargs),
        grad.conv2d_weight(x, shared.shape, gy, device=device, **kwargs).reshape(w.shape))
    # and it is a convolution (the reference's)
    assert_close(y, conv2d_ref(x, shared, b, **kwargs),
                 conv2d_ref(np.abs(x), np.abs(shared), np.abs(b), **kwargs), np.float32)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("geometry", [GEOMETRIES[2], GEOMETRIES[6]], ids=["stride2", "groups"])
def test_a_slot_per_position_is_local_conv2d_bit_for_bit(geometry, tiling, device):
    _, _, _, _, kwargs, out_hw = _problem(geometry, np.float32, tiling, 6)
    x, w, b, gy, kwargs, _ = _problem(geometry, np.float32, tiling, 6, tiles=out_hw)
    y = gpuconv.tiled_conv2d(x, w, b, tiling=tiling, device=device, **kwargs)
    assert np.array_equal(y, gpuconv.local_conv2d(x, w, b, device=device, **kwargs))
    assert np.array_equal(
        grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs),
        grad.local_conv2d_input(x.shape, w, gy, device=device, **kwargs))
    assert np.array_equal(
        grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling, device=device, **kwargs),
        grad.local_conv2d_weight(x, w.shape, gy, device=device, **kwargs))


@pytest.mark.parametrize("tiling", TILINGS)
def test_between_the_ends_it_is_local_conv2d_of_the_expanded_weight(tiling, device):
    """With more slots than a few (6 here), the tiled kernels read each position's slot where
    local_conv2d reads its own kernel (forward and input gradient): the same terms in the
    same order, so the same bits."""
    x, w, b, _, kwargs, out_hw = _problem(GEOMETRIES[0], np.float32, tiling, 7, tiles=(2, 3))
    if device == "cuda":
        # local_conv2d streams the weights at batches <= 8 (its own order of sums), the
        # tiled forward runs the batched kernel: the same kernel from 9 images on
        from gpuconv.cuda.local_stream import STREAM_MAX_BATCH

        x = np.concatenate([x] * 5)[:STREAM_MAX_BATCH + 1]
    y = gpuconv.tiled_conv2d(x, w, b, tiling=tiling, device=device, **kwargs)
    wl = _expand(w, out_hw, tiling).astype(np.float32)
    bl = _bias_expand(b, out_hw, tiling).astype(np.float32)
    assert np.array_equal(y, gpuconv.local_conv2d(x, wl, bl, device=device, **kwargs))
    gy = np.random.default_rng(8).uniform(-1, 1, y.shape).astype(np.float32)
    assert np.array_equal(
        grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs),
        grad.local_conv2d_input(x.shape, wl, gy, device=device, **kwargs))


def test_the_slot_rules():
    """Periodic tiles repeat with period T; blocks are T near-equal runs (output 7, T 3)."""
    x = np.ones((1, 1, 1, 7))
    w = np.arange(1.0, 4.0).reshape(1, 1, 3, 1, 1, 1)
    periodic = gpuconv.tiled_conv2d(x, w, device="cpu")[0, 0, 0]
    blocks = gpuconv.tiled_conv2d(x, w, tiling="blocks", device="cpu")[0, 0, 0]
    assert periodic.tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert blocks.tolist() == [1, 1, 1, 2, 2, 3, 3]


# --------------------------------------------------------------------------------------------
# arguments as conv2d takes them
# --------------------------------------------------------------------------------------------

def test_unbatched_input_and_a_bias_per_map():
    x, w, _, _, kwargs, out_hw = _problem(GEOMETRIES[1], np.float64, "blocks", 8, tiles=(2, 2))
    b = np.arange(w.shape[0], dtype=np.float64)
    y = gpuconv.tiled_conv2d(x[0], w, b, tiling="blocks", device="cpu", **kwargs)
    wl = _expand(w, out_hw, "blocks")
    expected = local_conv2d_ref(x[:1], wl, b, **kwargs)[0]
    assert y.shape == expected.shape
    assert_close(y, expected, np.abs(expected) + 1, np.float64)


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch")
    x, w, b, _, kwargs, _ = _problem(GEOMETRIES[0], np.float32, "periodic", 9, tiles=(2, 2))
    y = gpuconv.tiled_conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                             device="cpu", **kwargs)
    assert isinstance(y, torch.Tensor)
    assert np.array_equal(y.numpy(), gpuconv.tiled_conv2d(x, w, b, device="cpu", **kwargs))


def test_empty_batch_gives_the_bias_of_each_slot():
    w = np.zeros((2, 2, 3, 1, 1, 1))
    b = np.arange(12.0).reshape(2, 2, 3)
    y = gpuconv.tiled_conv2d(np.zeros((1, 0, 4, 3)), np.zeros((2, 2, 3, 0, 1, 1)), b,
                             device="cpu")
    assert y.shape == (1, 2, 4, 3)
    assert np.array_equal(y[0, 1], b[1][[0, 1, 0, 1]])
    assert gpuconv.tiled_conv2d(np.zeros((0, 1, 4, 3)), w, b, device="cpu").shape == (0, 2, 4, 3)


def test_more_slots_than_outputs_is_refused_naming_weight_and_the_output_size():
    x = np.zeros((1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"weight holds 4x2 kernel slots.*3x3 output"):
        gpuconv.tiled_conv2d(x, np.zeros((1, 4, 2, 1, 3, 3)), device="cpu")
    with pytest.raises(ValueError, match=r"weight_size holds 1x4 kernel slots.*3x3 output"):
        grad.tiled_conv2d_weight(x, (1, 1, 4, 1, 3, 3), np.zeros((1, 1, 3, 3)), device="cpu")
    with pytest.raises(ValueError, match=r"weight holds 0x1"):
        gpuconv.tiled_conv2d(x, np.zeros((1, 0, 1, 1, 3, 3)), device="cpu")


def test_other_errors_name_the_argument():
    x = np.zeros((1, 1, 5, 5))
    w = np.zeros((1, 2, 2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"tiling must be one of 'periodic', 'blocks', got 'rows'"):
        gpuconv.tiled_conv2d(x, w, tiling="rows", device="cpu")
    with pytest.raises(ValueError, match=r"weight must be 6-D \(C_out, T_h, T_w, C_in/groups"):
        gpuconv.tiled_conv2d(x, np.zeros((1, 1, 3, 3)), device="cpu")
    with pytest.raises(ValueError, match=r"bias must have shape \(1,\) or \(1, 2, 2\)"):
        gpuconv.tiled_conv2d(x, w, np.zeros((1, 3, 3)), device="cpu")
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        gpuconv.tiled_conv2d(x, w, np.zeros(1, np.float32), device="cpu")
    with pytest.raises(ValueError, match="grad_output must have the forward's output shape"):
        grad.tiled_conv2d_input(x.shape, w, np.zeros((1, 1, 2, 2)), device="cpu")


# --------------------------------------------------------------------------------------------
# the PyTorch layer
# --------------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("tiling", TILINGS)
def test_gradcheck_through_the_torch_layer(tiling):
    torch = _torch()
    import gpuconv.torch as gt

    torch.manual_seed(0)
    layer = gt.TiledConv2d(3, 4, (3, 2), tiles=(2, 3), tiling=tiling, stride=(1, 2),
                           padding=1, groups=1).double()
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return gt.tiled_conv2d(x, w, b, (1, 2), 1, tiling=tiling)

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias))
    assert torch.autograd.gradgradcheck(f, (x, layer.weight, layer.bias))


def test_torch_layer_matches_the_reference_and_its_gradients():
    torch = _torch()
    import gpuconv.torch as gt

    torch.manual_seed(1)
    layer = gt.TiledConv2d(2, 3, 3, tiles=2, tiling="blocks", padding=1).double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = layer.weight.detach().numpy()
    b = layer.bias.detach().numpy()
    wl, bl = _expand(w, (5, 4), "blocks"), _bias_expand(b, (5, 4), "blocks")
    expected = local_conv2d_ref(x.detach().numpy(), wl, bl, padding=1)
    assert_close(y.detach().numpy(), expected, np.abs(expected) + 1, np.float64)
    gy = torch.randn_like(y)
    y.backward(gy)
    gb = _fold(gy.sum(0).numpy()[..., None], (2, 2), "blocks")[..., 0]
    assert np.allclose(layer.bias.grad.numpy(), gb, rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_equals_eager():
    torch = _torch()
    import gpuconv.torch as gt

    torch.manual_seed(2)
    layer = gt.TiledConv2d(3, 4, 3, tiles=(2, 2), padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
    x.grad = layer.weight.grad = layer.bias.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, eager)
    for got, want in zip([x.grad, layer.weight.grad, layer.bias.grad], eager_grads):
        assert torch.equal(got, want)


def test_from_conv2d_unties_a_convolution_and_the_state_dict_round_trips():
    torch = _torch()
    import gpuconv.torch as gt

    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect").double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    for tiles, tiling in (((1, 1), "periodic"), ((3, 2), "blocks"), ((7, 6), "periodic")):
        layer = gt.TiledConv2d.from_conv2d(conv, tiles, tiling)
        assert layer.weight.shape == (5, *tiles, 3, 3, 3) and layer.bias.shape == (5, *tiles)
        assert torch.allclose(layer(x), conv(x), rtol=0, atol=1e-12)
        other = gt.TiledConv2d(3, 5, 3, tiles, tiling, padding=1, padding_mode="reflect").double()
        other.load_state_dict(layer.state_dict())
        assert torch.equal(other(x), layer(x))
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d"):
        gt.TiledConv2d.from_conv2d(torch.nn.Linear(2, 2), 2)


def test_torch_layer_takes_any_input_size_but_refuses_more_tiles_than_outputs():
    torch = _torch()
    import gpuconv.torch as gt

    layer = gt.TiledConv2d(1, 2, 3, tiles=(3, 3))
    assert layer(torch.randn(1, 1, 9, 9)).shape == (1, 2, 7, 7)
    assert layer(torch.randn(1, 12, 5)).shape == (2, 10, 3)
    with pytest.raises(ValueError, match=r"weight holds 3x3 kernel slots.*2x2 output"):
        layer(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="tiling must be one of"):
        gt.TiledConv2d(1, 2, 3, tiles=2, tiling="stripes")


_FEW_SLOT_GEOMETRIES = [g for g in GEOMETRIES if g[0] in (
    "pad1", "stride2", "stride_gt_kernel", "rect_kernel", "dilation", "groups", "same_even",
    "big_padding", "output_1x1_strided")] + [
    # slots whose windows see only padding (blocks 3 x 1: rows 0-1 of 7): the unshared path
    ("padding_only_slot", 1, 1, 1, 2, 2, 1, 1, 3, 1, 1)]


@pytest.mark.parametrize("tiles", [(2, 2), (1, 4), (3, 1)], ids=["2x2", "1x4", "3x1"])
@pytest.mark.parametrize("geometry", _FEW_SLOT_GEOMETRIES, ids=[g[0] for g in _FEW_SLOT_GEOMETRIES])
@pytest.mark.parametrize("tiling", TILINGS)
def test_weight_grad_with_few_slots(tiling, geometry, tiles, device):
    """A few slots: on the CPU one conv2d weight gradient per slot (a strided or cropped
    convolution, with the padding it reaches), where the windows allow."""
    _, _, _, _, _, out_hw = _problem(geometry, np.float64, tiling, 9)
    tiles = (min(tiles[0], out_hw[0]), min(tiles[1], out_hw[1]))
    x, w, _, gy, kwargs, _ = _problem(geometry, np.float64, tiling, 9, tiles=tiles)
    gw = grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling, device=device, **kwargs)
    local_shape = (w.shape[0], *out_hw) + w.shape[3:]
    expected = _fold(local_conv2d_weight_grad_ref(x, local_shape, gy, **kwargs), tiles, tiling)
    bound = _fold(local_conv2d_weight_grad_ref(np.abs(x), local_shape, np.abs(gy), **kwargs),
                  tiles, tiling)
    assert_close(gw, expected, bound, np.float64)
    assert np.array_equal(gw, grad.tiled_conv2d_weight(x, w.shape, gy, tiling=tiling,
                                                        device=device, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("tiles", [(2, 2), (1, 4), (3, 1)], ids=["2x2", "1x4", "3x1"])
@pytest.mark.parametrize("geometry", _FEW_SLOT_GEOMETRIES, ids=[g[0] for g in _FEW_SLOT_GEOMETRIES])
@pytest.mark.parametrize("tiling", TILINGS)
def test_forward_and_input_grad_with_few_slots(tiling, geometry, tiles, dtype, device,
                                              poisoned_outputs):
    """A few slots: on the CPU one conv2d (and one conv2d input gradient) per slot, its
    outputs placed on the slot's rows and columns (every output written: the outputs start
    as NaN) and its input gradients added where its windows read; a bias per slot and one
    per map."""
    _, _, _, _, _, out_hw = _problem(geometry, dtype, tiling, 11)
    tiles = (min(tiles[0], out_hw[0]), min(tiles[1], out_hw[1]))
    x, w, b, gy, kwargs, _ = _problem(geometry, dtype, tiling, 11, tiles=tiles)
    wl = _expand(w, out_hw, tiling)
    for bias, bl in ((b, _bias_expand(b, out_hw, tiling)),
                     (b[:, 0, 0].copy(), np.repeat(np.repeat(
                         np.asarray(b[:, :1, :1], dtype=np.float64), out_hw[0], 1), out_hw[1], 2))):
        y = gpuconv.tiled_conv2d(x, w, bias, tiling=tiling, device=device, **kwargs)
        expected = local_conv2d_ref(x, wl, bl, **kwargs)
        bound = local_conv2d_ref(np.abs(x), np.abs(wl), np.abs(bl), **kwargs)
        assert_close(y, expected, bound, dtype, terms=w[0, 0, 0].size + 1)
    gx = grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling, device=device, **kwargs)
    expected = local_conv2d_input_grad_ref(x.shape, wl, gy, **kwargs)
    bound = local_conv2d_input_grad_ref(x.shape, np.abs(wl), np.abs(gy), **kwargs)
    assert_close(gx, expected, bound, dtype, terms=w.shape[0] * w.shape[-2] * w.shape[-1])
    assert np.array_equal(gx, grad.tiled_conv2d_input(x.shape, w, gy, tiling=tiling,
                                                       device=device, **kwargs))


def test_which_tilings_run_as_one_convolution_per_slot():
    """The CPU rule of gpuconv.cpu.tiled_conv2d: a few slots run as convolutions where the
    unshared kernel's batch vectors are mostly idle or the slots are wide; DeepFace L6 at
    its CPU batch (8 images, slots 10-11 columns wide) keeps the slot maps; a slot stride
    above 4 keeps them for the input gradient."""
    from gpuconv.cpu import tiled_conv2d as cpu_tiled
    from gpuconv.geometry import tiled_geometry
    from gpuconv.workloads import LAYERS

    def chosen(layer, tiles, tiling, gradient=False, itemsize=4, batch=None):
        layer = LAYERS[layer]
        geom = tiled_geometry(layer.geometry(batch or layer.batch_cpu), tiles, tiling)
        return cpu_tiled._few_slot_problems(geom, itemsize, gradient) is not None

    assert chosen("deepface-l6", (2, 2), "blocks") is False
    assert chosen("deepface-l6", (2, 2), "blocks", batch=4) is True
    assert chosen("deepface-l6", (2, 2), "blocks", batch=4, itemsize=8) is False
    assert chosen("deepface-l4", (2, 2), "periodic") is True        # slots 27-28 wide
    assert chosen("seed-conv1", (1, 4), "blocks", gradient=True) is True
    assert chosen("alexnet-conv1", (2, 2), "periodic") is True
    assert chosen("alexnet-conv1", (2, 2), "periodic", gradient=True) is False  # stride 8
    assert chosen("alexnet-conv1", (2, 2), "blocks", gradient=True) is True
    assert chosen("seed-conv1", (3, 2), "blocks") is False          # more than 4 slots


def test_tiled_speed_script_runs():
    # scripts/tiled_speed.py times the dial's points beside conv2d and local_conv2d
    import importlib.util
    import pathlib
    import time

    path = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "tiled_speed.py"
    spec = importlib.util.spec_from_file_location("tiled_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.run(["deepface-l6"], 1, 1, time.perf_counter, [2], gradients=True,
                      tiling="blocks")
    assert [r[1] for r in rows][:3] == ["T=1x1 vs conv2d", "T=21x21 vs local_conv2d",
                                       "T=2x2 (blocks) vs local_conv2d"]
    assert all(r[2] > 0 and r[3] > 0 for r in rows)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if g[0] in (
    "pad1", "stride2", "rect_kernel", "dilation", "groups", "big_padding")],
    ids=lambda g: g[0])
@pytest.mark.parametrize("tiling", TILINGS)
def test_one_image_between_the_ends(tiling, geometry, device, poisoned_outputs):
    """One image and more than a few slots: on the CPU the one-image unshared kernel reads
    each column's slot (its weight row) and each row's; the float64 reference, a bias per
    slot, and local_conv2d of the expanded weight bit for bit."""
    _, _, _, _, _, out_hw = _problem(geometry, np.float32, tiling, 13)
    tiles = (min(2, out_hw[0]), min(3, out_hw[1]))
    x, w, b, _, kwargs, _ = _problem(geometry, np.float32, tiling, 13, tiles=tiles)
    x = x[:1]
    y = gpuconv.tiled_conv2d(x, w, b, tiling=tiling, device=device, **kwargs)
    wl, bl = _expand(w, out_hw, tiling), _bias_expand(b, out_hw, tiling)
    expected = local_conv2d_ref(x, wl, bl, **kwargs)
    bound = local_conv2d_ref(np.abs(x), np.abs(wl), np.abs(bl), **kwargs)
    assert_close(y, expected, bound, np.float32, terms=w[0, 0, 0].size + 1)
    # (a few slots run as convolutions: other bits; on CUDA, local_conv2d streams one
    # image's weights in its own order of sums, the tiled forward runs the batched kernel)
    if tiles[0] * tiles[1] > 4 and device == "cpu":
        assert np.array_equal(y, gpuconv.local_conv2d(
            x, wl.astype(np.float32), bl.astype(np.float32), device=device, **kwargs))


def test_bias_gradient_per_slot_sums_in_float64():
    """The per-slot bias gradient sums a slot's positions without rounding between terms
    (on CUDA its products are matrix products, which TF32 or half-precision reductions
    would round): 1e8 + 1 - 1e8 in one slot is 1, not float32's 0."""
    torch = pytest.importorskip("torch")
    from gpuconv.torch import tiled

    grad = torch.tensor([[[[1e8, 1.0, -1e8, 0.5]]]], dtype=torch.float32)  # (1, 1, 1, 4)
    for tiling, expected in (("periodic", [[1e8 - 1e8 + 0.0, 1.0 + 0.5]]),
                             ("blocks", [[1e8 + 1.0, -1e8 + 0.5]])):
        got = tiled._bias_grad(grad, (1, 1, 2), (None, tiling))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float32))
    got = tiled._bias_grad(grad, (1, 1, 1), (None, "blocks"))
    assert float(got) == 1.5
