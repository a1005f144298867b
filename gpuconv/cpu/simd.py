"""SIMD vectors as Numba values, for the CPU kernels' register blocks.

Numba's loop vectoriser only vectorises innermost loops, so a register block of
accumulators that survives a whole reduction loop cannot be written with arrays. These few
intrinsics give Numba code a vector value of ``VECTOR_BYTES`` bytes (16 float32 or 8 float64:
one AVX-512 register; LLVM splits it into narrower registers on other processors, so the
code is portable, only slower there). Every multiply-add is one fused multiply-add
(``llvm.fma``); nothing else is relaxed.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["VECTOR_BYTES", "prefer_wide_vectors", "vzero", "vload", "vstore", "vfma"]


@intrinsic
def prefer_wide_vectors(typingctx):
    """Let LLVM use the widest vector registers (512-bit on AVX-512) in the calling function.

    LLVM tunes several AVX-512 processors to prefer 256-bit vectors ("prefer-vector-width"),
    which halves the throughput of a compute-bound loop. These two function attributes lift
    that for the one function that calls this; on processors without wider registers they
    change nothing (the vectoriser never exceeds the real register width).
    """
    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        # llvmlite only knows enum attributes; string attributes go straight into the set.
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')
        # Kept out of line: the loop vectoriser runs after Numba links the callers in, and
        # inlined into a caller without these attributes the loop would get narrow vectors.
        if "alwaysinline" not in attributes:
            attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen



VECTOR_BYTES = 64


class _Vector(types.Type):
    """``lanes`` elements of ``dtype`` (a Numba float type) held in one SSA value."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vector({dtype} x {lanes})")


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _vector_of(array_type):
    return _Vector(array_type.dtype, VECTOR_BYTES // array_type.dtype.bitwidth * 8)


@intrinsic
def vzero(typingctx, array):
    """A vector of zeros with the element type of ``array``."""
    vector = _vector_of(array)

    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(vector), None)

    return vector(array), codegen


@intrinsic
def vload(typingctx, array, index):
    """``array[index : index + lanes]`` of a 1-D C-contiguous array, as a vector
    (unaligned; no bounds check: the caller guarantees the range)."""
    vector = _vector_of(array)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        pointer = builder.bitcast(pointer, context.get_value_type(vector).as_pointer())
        return builder.load(pointer, align=array.dtype.bitwidth // 8)

    return vector(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, value):
    """``array[index : index + lanes] = value`` (unaligned, no bounds check)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        pointer = builder.bitcast(pointer, args[2].type.as_pointer())
        builder.store(args[2], pointer, align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(array, index, value), codegen


@intrinsic
def vfma(typingctx, acc, weights, x):
    """``acc + weights * x`` lane by lane, with the scalar ``x`` broadcast; one fused
    multiply-add (a single rounding; NaN and Inf propagate as in IEEE arithmetic)."""
    if not isinstance(acc, _Vector) or weights != acc or x != acc.dtype:
        return None

    def codegen(context, builder, signature, args):
        vector_type = args[0].type
        lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), args[2],
                                       ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
        broadcast = builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined), mask)
        element = "f32" if vector_type.element == ir.FloatType() else "f64"
        name = f"llvm.fma.v{vector_type.count}{element}"
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector_type, [vector_type] * 3), name)
        return builder.call(fma, [args[1], broadcast, args[0]])

    return acc(acc, weights, x), codegen

