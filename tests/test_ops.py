"""The operations registry: every row names kernels that exist, with the contracts it states."""

import inspect

import pytest

from gpuconv.ops import FORWARD, INPUT_GRAD, OPS, WEIGHT_GRAD

FIRST_ARGS = {FORWARD: ["x", "weight", "bias"], INPUT_GRAD: ["grad_output", "weight"],
              WEIGHT_GRAD: ["x", "grad_output"]}


@pytest.mark.parametrize("name", list(OPS))
def test_every_row_names_callable_kernels_with_the_stated_arguments(name):
    op = OPS[name]
    cpu = inspect.signature(op.kernel("cpu")).parameters
    cuda = inspect.signature(op.kernel("cuda")).parameters
    operands = len(FIRST_ARGS[op.kind])
    # CPU: operands (the forward's bias as bias + has_bias), out, geom
    assert list(cpu)[-2:] == ["out", "geom"]
    assert len(cpu) == operands + 2 + (op.kind == FORWARD)
    # CUDA: operands, out, geom, stream, then keyword scratch allocator
    assert list(cuda)[operands:operands + 3] == ["out", "geom", "stream"]
    assert "empty" in cuda
    assert callable(op.scratch("cpu")) and callable(op.scratch("cuda"))


def test_rows_cover_both_operations_and_all_three_kinds():
    kinds = {(op.local, op.kind) for op in OPS.values()}
    assert kinds == {(local, kind) for local in (False, True)
                     for kind in (FORWARD, INPUT_GRAD, WEIGHT_GRAD)}


def test_output_shapes_follow_the_kind():
    from gpuconv.geometry import conv_geometry

    geom = conv_geometry((2, 4, 9, 8), (3, 2), 6, stride=(2, 1), padding=1, groups=2)
    assert OPS["conv2d"].output_shape(geom) == (2, 6, 5, 9)
    assert OPS["conv2d_input"].output_shape(geom) == (2, 4, 9, 8)
    assert OPS["conv2d_weight"].output_shape(geom) == (6, 2, 3, 2)
    assert OPS["local_conv2d_weight"].output_shape(geom) == (6, 5, 9, 2, 3, 2)
