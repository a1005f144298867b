"""Slow, obviously-right float64 references for both operations.

Independent of the package: its own padding rules, explicit zero padding, one output
position at a time with ``np.einsum`` in float64. Every test compares against these.
"""

import numpy as np


def _pairs(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _padding(padding, kernel_hw, stride, dilation):
    """(top, bottom, left, right), resolved here independently of gpuconv.geometry."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        assert stride == (1, 1)
        th = dilation[0] * (kernel_hw[0] - 1)
        tw = dilation[1] * (kernel_hw[1] - 1)
        # PyTorch puts the odd extra row/column at the bottom/right.
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    if isinstance(padding, (tuple, list)) and isinstance(padding[0], (tuple, list)):
        (top, bottom), (left, right) = padding  # explicit ((top, bottom), (left, right))
        return top, bottom, left, right
    ph, pw = _pairs(padding)
    return ph, ph, pw, pw


def padding_totals(padding, kernel_hw, stride=1, dilation=1):
    """(top + bottom, left + right) padding, resolved here independently of gpuconv."""
    top, bottom, left, right = _padding(padding, kernel_hw, _pairs(stride), _pairs(dilation))
    return top + bottom, left + right


def output_size(in_hw, kernel_hw, stride=1, padding=0, dilation=1):
    """(H_out, W_out): how many dilated windows fit in the padded input, stepping by stride."""
    totals = padding_totals(padding, kernel_hw, stride, dilation)
    return tuple((size + total - (d * (k - 1) + 1)) // s + 1 for size, total, k, s, d in
                 zip(in_hw, totals, kernel_hw, _pairs(stride), _pairs(dilation)))


def _windows(x, kernel_hw, stride, padding, dilation):
    """Yield (i, j, window) where window is x_padded[:, :, rows, cols] of shape (N, C, kH, kW)."""
    x = np.asarray(x, dtype=np.float64)
    stride, dilation = _pairs(stride), _pairs(dilation)
    top, bottom, left, right = _padding(padding, kernel_hw, stride, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = kernel_hw
    span_h = dilation[0] * (kh - 1) + 1
    span_w = dilation[1] * (kw - 1) + 1
    out_h = (xp.shape[2] - span_h) // stride[0] + 1
    out_w = (xp.shape[3] - span_w) // stride[1] + 1
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride[0], j * stride[1]
            yield i, j, out_h, out_w, xp[:, :, r0:r0 + span_h:dilation[0], c0:c0 + span_w:dilation[1]]


def conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """float64 reference of gpuconv.conv2d: w is (C_out, C_in/groups, kH, kW)."""
    w = np.asarray(w, dtype=np.float64)
    n, c_in = x.shape[:2]
    c_out, c_in_g = w.shape[:2]
    c_out_g = c_out // groups
    out = None
    for i, j, out_h, out_w, win in _windows(x, w.shape[2:], stride, padding, dilation):
        if out is None:
            out = np.zeros((n, c_out, out_h, out_w))
        for g in range(groups):
            wg = w[g * c_out_g:(g + 1) * c_out_g]
            xg = win[:, g * c_in_g:(g + 1) * c_in_g]
            out[:, g * c_out_g:(g + 1) * c_out_g, i, j] = np.einsum("ncuv,ocuv->no", xg, wg)
    if b is not None:
        out += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return out


def local_conv2d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """float64 reference of gpuconv.local_conv2d: w is (C_out, H_out, W_out, C_in/groups, kH, kW)."""
    w = np.asarray(w, dtype=np.float64)
    n = x.shape[0]
    c_out, c_in_g = w.shape[0], w.shape[3]
    c_out_g = c_out // groups
    out = None
    for i, j, out_h, out_w, win in _windows(x, w.shape[4:], stride, padding, dilation):
        if out is None:
            assert (out_h, out_w) == w.shape[1:3]
            out = np.zeros((n, c_out, out_h, out_w))
        for g in range(groups):
            wg = w[g * c_out_g:(g + 1) * c_out_g, i, j]
            xg = win[:, g * c_in_g:(g + 1) * c_in_g]
            out[:, g * c_out_g:(g + 1) * c_out_g, i, j] = np.einsum("ncuv,ocuv->no", xg, wg)
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        out += b[None, :, None, None] if b.ndim == 1 else b[None]
    return out


# Tolerances relative to the magnitude bound max(ref(|x|, |w|, |b|)), per dtype: the
# error of a float sum is bounded by its terms' absolute values; these values are the
# core issue's acceptance criteria (1e-5 float32, 1e-12 float64).
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def half_tolerance(terms):
    """Relative tolerance of a float16 result accumulated in float32 over ``terms`` products:
    one float16 rounding of the result (half an ulp, eps16 / 2 = 2**-11, taken twice for
    margin) plus at most ``terms`` float32 roundings of partial sums (eps32 / 2 = 2**-24
    each), all relative to the magnitude bound. The inputs are float16 values, exact in the
    float64 reference."""
    return 2.0 ** -10 + terms * 2.0 ** -23


def assert_close(result, ref, bound, dtype, terms=None):
    """max|result - ref| <= tol(dtype) * max(bound), with a clear message on failure.
    float16 needs ``terms``, the length of each output's reduction."""
    result = np.asarray(result, dtype=np.float64)
    assert result.shape == ref.shape, f"shape {result.shape} != reference {ref.shape}"
    scale = max(float(np.max(np.abs(bound))) if bound.size else 0.0, np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(result - ref))) if ref.size else 0.0
    if np.dtype(dtype) == np.float16:
        tol = half_tolerance(terms)
    else:
        tol = TOLERANCE[np.dtype(dtype)]
    assert np.all(np.isfinite(result)), "result has NaN/Inf where the reference has none"
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:g} * {scale:.3e}"


# --------------------------------------------------------------------------------------------
# Gradients: written from the forward's definition, window by window, in float64. Each
# window (i, j) of the padded input received sum_{o} w[o, (i, j), c, u, v] * gy[n, o, i, j]
# in the forward, so the input gradient scatters gy back through the same windows and the
# weight gradient gathers x_window * gy. No code is shared with gpuconv.
# --------------------------------------------------------------------------------------------

def _padded_windows(input_hw, kernel_hw, stride, padding, dilation):
    """(pad, out_h, out_w, [(i, j, row slice, col slice)]) of the padded input."""
    stride, dilation = _pairs(stride), _pairs(dilation)
    top, bottom, left, right = _padding(padding, kernel_hw, stride, dilation)
    kh, kw = kernel_hw
    span_h = dilation[0] * (kh - 1) + 1
    span_w = dilation[1] * (kw - 1) + 1
    hp, wp = input_hw[0] + top + bottom, input_hw[1] + left + right
    out_h = (hp - span_h) // stride[0] + 1
    out_w = (wp - span_w) // stride[1] + 1
    slices = []
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride[0], j * stride[1]
            slices.append((i, j, slice(r0, r0 + span_h, dilation[0]),
                           slice(c0, c0 + span_w, dilation[1])))
    return (top, bottom, left, right), out_h, out_w, slices


def _input_grad(input_shape, kernels_at, gy, kernel_hw, stride, padding, dilation, groups):
    n, c_in, h, w = input_shape
    gy = np.asarray(gy, dtype=np.float64)
    (top, bottom, left, right), _, _, slices = _padded_windows(
        (h, w), kernel_hw, stride, padding, dilation)
    gxp = np.zeros((n, c_in, h + top + bottom, w + left + right))
    c_out = gy.shape[1]
    c_in_g, c_out_g = c_in // groups, c_out // groups
    for i, j, rows, cols in slices:
        wij = kernels_at(i, j)  # (C_out, C_in/groups, kH, kW)
        for g in range(groups):
            contrib = np.einsum("no,ocuv->ncuv", gy[:, g * c_out_g:(g + 1) * c_out_g, i, j],
                                wij[g * c_out_g:(g + 1) * c_out_g])
            gxp[:, g * c_in_g:(g + 1) * c_in_g, rows, cols] += contrib
    return gxp[:, :, top:top + h, left:left + w]


def conv2d_input_grad_ref(input_shape, w, gy, stride=1, padding=0, dilation=1, groups=1):
    """float64 d(sum(conv2d(x, w) * gy)) / dx, x of shape ``input_shape``."""
    w = np.asarray(w, dtype=np.float64)
    return _input_grad(input_shape, lambda i, j: w, gy, w.shape[2:], stride, padding,
                       dilation, groups)


def local_conv2d_input_grad_ref(input_shape, w, gy, stride=1, padding=0, dilation=1, groups=1):
    """float64 d(sum(local_conv2d(x, w) * gy)) / dx."""
    w = np.asarray(w, dtype=np.float64)
    return _input_grad(input_shape, lambda i, j: w[:, i, j], gy, w.shape[4:], stride, padding,
                       dilation, groups)


def _weight_grad_terms(x, gy, kernel_hw, stride, padding, dilation, groups):
    """Yield (i, j, per-position weight gradient (C_out, C_in/groups, kH, kW))."""
    x = np.asarray(x, dtype=np.float64)
    gy = np.asarray(gy, dtype=np.float64)
    c_in, c_out = x.shape[1], gy.shape[1]
    c_in_g, c_out_g = c_in // groups, c_out // groups
    (top, bottom, left, right), _, _, slices = _padded_windows(
        x.shape[2:], kernel_hw, stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    for i, j, rows, cols in slices:
        win = xp[:, :, rows, cols]
        term = np.zeros((c_out, c_in_g) + tuple(kernel_hw))
        for g in range(groups):
            term[g * c_out_g:(g + 1) * c_out_g] = np.einsum(
                "no,ncuv->ocuv", gy[:, g * c_out_g:(g + 1) * c_out_g, i, j],
                win[:, g * c_in_g:(g + 1) * c_in_g])
        yield i, j, term


def conv2d_weight_grad_ref(x, weight_shape, gy, stride=1, padding=0, dilation=1, groups=1):
    """float64 d(sum(conv2d(x, w) * gy)) / dw, w of shape ``weight_shape``."""
    total = np.zeros(weight_shape)
    for _, _, term in _weight_grad_terms(x, gy, weight_shape[2:], stride, padding, dilation,
                                         groups):
        total += term
    return total


def local_conv2d_weight_grad_ref(x, weight_shape, gy, stride=1, padding=0, dilation=1, groups=1):
    """float64 d(sum(local_conv2d(x, w) * gy)) / dw, w of shape ``weight_shape``."""
    out = np.zeros(weight_shape)
    for i, j, term in _weight_grad_terms(x, gy, weight_shape[4:], stride, padding, dilation,
                                         groups):
        out[:, i, j] = term
    return out


# --------------------------------------------------------------------------------------------
# The rest of the family, from their definitions: a transposed convolution spreads each input
# pixel through its kernel over a canvas of the full output, which its padding then crops; a
# 1-D convolution slides its window along one axis. No code is shared with gpuconv.
# --------------------------------------------------------------------------------------------

def local_conv_transpose2d_ref(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1,
                               dilation=1):
    """float64 reference of gpuconv.local_conv_transpose2d: x (N, C_in, H_in, W_in),
    w (C_in, H_in, W_in, C_out/groups, kH, kW); b None, (C_out,) or (C_out, H_out, W_out)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    (s_h, s_w), (p_h, p_w) = _pairs(stride), _pairs(padding)
    (op_h, op_w), (d_h, d_w) = _pairs(output_padding), _pairs(dilation)
    n, c_in, h_in, w_in = x.shape
    c_out_g, kh, kw = w.shape[3:]
    c_in_g = c_in // groups
    canvas = np.zeros((n, c_out_g * groups, (h_in - 1) * s_h + d_h * (kh - 1) + 1 + op_h,
                       (w_in - 1) * s_w + d_w * (kw - 1) + 1 + op_w))
    for i in range(h_in):
        for j in range(w_in):
            rows = slice(i * s_h, i * s_h + d_h * (kh - 1) + 1, d_h)
            cols = slice(j * s_w, j * s_w + d_w * (kw - 1) + 1, d_w)
            for g in range(groups):
                ins, outs = slice(g * c_in_g, (g + 1) * c_in_g), slice(g * c_out_g, (g + 1) * c_out_g)
                canvas[:, outs, rows, cols] += np.einsum("nc,couv->nouv", x[:, ins, i, j],
                                                         w[ins, i, j])
    out_h = canvas.shape[2] - 2 * p_h
    out_w = canvas.shape[3] - 2 * p_w
    out = canvas[:, :, p_h:p_h + out_h, p_w:p_w + out_w].copy()
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        out += b[None, :, None, None] if b.ndim == 1 else b[None]
    return out


def local_conv1d_ref(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """float64 reference of gpuconv.local_conv1d: x (N, C_in, L), w (C_out, L_out, C_in/groups, k),
    b None, (C_out,) or (C_out, L_out); padding an int, "valid" or "same" (stride 1)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    c_out, l_out, c_in_g, k = w.shape
    c_out_g = c_out // groups
    if padding == "valid":
        left = right = 0
    elif padding == "same":
        total = dilation * (k - 1)
        left, right = total // 2, total - total // 2
    else:
        left = right = padding
    xp = np.pad(x, ((0, 0), (0, 0), (left, right)))
    out = np.zeros((x.shape[0], c_out, l_out))
    for i in range(l_out):
        window = xp[:, :, i * stride:i * stride + dilation * (k - 1) + 1:dilation]
        for g in range(groups):
            out[:, g * c_out_g:(g + 1) * c_out_g, i] = np.einsum(
                "ncu,ocu->no", window[:, g * c_in_g:(g + 1) * c_in_g],
                w[g * c_out_g:(g + 1) * c_out_g, i])
    if b is not None:
        b = np.asarray(b, dtype=np.float64)
        out += b[None, :, None] if b.ndim == 1 else b[None]
    return out
