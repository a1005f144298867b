"""More vector intrinsics for the gradient kernels, on the vectors of :mod:`.simd`.

- :func:`vfmav`: ``acc + a * b`` with two vectors (the pixel-vector dot products of the
  shared weight gradient);
- :func:`vload_masked`: a load whose lanes are zero where a byte mask is zero (junk pixels
  of a padded grid contribute exactly nothing, whatever they hold: ``0 * inf`` never
  happens because the junk value itself is never read);
- :func:`vstore_first`: store only the first ``count`` lanes (the tail of a run, without
  touching the memory after it); :func:`vload_first`, its load (the other lanes zero);
- :func:`vload_bytes`: a narrower vector (its size a constant), for a vector dimension
  shorter than a full register (a batch of 8 float32 needs 32 bytes, not 64; a 512-bit
  operation costs two 256-bit ones on some processors). :func:`.simd.vfma` and
  :func:`.simd.vstore` take vectors of any width.
- :func:`vsum_lanes`: the lane sums of a group of vectors, by a fixed tree;
- :func:`vtranspose`: a square block of ``lanes x lanes`` elements transposed in registers
  (the shared forward's pixel-major tiles written to channel-major outputs);
- :func:`vadd_scalar`: a vector plus a broadcast scalar.

As in :mod:`.simd`: one fused multiply-add per multiply-add, nothing relaxed.
"""

from __future__ import annotations

from llvmlite import ir
from numba import errors, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _Vector, _vector_of

__all__ = ["vfmav", "vload_bytes", "vload_first", "vload_masked", "vstore_first",
           "vsum_lanes", "vtranspose", "vadd_scalar"]


def _element(vector_type):
    return "f32" if vector_type.element == ir.FloatType() else "f64"


def _fma_name(vector_type):
    return f"llvm.fma.v{vector_type.count}{_element(vector_type)}"


@intrinsic
def vfmav(typingctx, acc, a, b):
    """``acc + a * b`` lane by lane (three vectors of one type), one fused multiply-add."""
    if not isinstance(acc, _Vector) or a != acc or b != acc:
        return None

    def codegen(context, builder, signature, args):
        vector_type = args[0].type
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector_type, [vector_type] * 3),
            _fma_name(vector_type))
        return builder.call(fma, [args[1], args[2], args[0]])

    return acc(acc, a, b), codegen


@intrinsic
def vload_bytes(typingctx, array, index, nbytes):
    """``array[index : index + lanes]`` as a vector of ``nbytes`` bytes (a compile-time
    constant, a multiple of the element size; unaligned, no bounds check)."""
    if not isinstance(nbytes, types.IntegerLiteral):
        raise errors.RequireLiteralValue("vload_bytes: nbytes must be a constant")
    vector = _Vector(array.dtype, nbytes.literal_value * 8 // array.dtype.bitwidth)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]),
                                  context.get_value_type(vector).as_pointer())
        return builder.load(pointer, align=array.dtype.bitwidth // 8)

    return vector(array, index, nbytes), codegen


def _lane_mask(builder, mask_data, mask_index, lanes):
    """``<lanes x i1>``: mask_data[mask_index + l] != 0 (a uint8 array)."""
    pointer = builder.gep(mask_data, [mask_index])
    byte_vector = ir.VectorType(ir.IntType(8), lanes)
    pointer = builder.bitcast(pointer, byte_vector.as_pointer())
    bytes_ = builder.load(pointer, align=1)
    return builder.icmp_unsigned("!=", bytes_, ir.Constant(byte_vector, None))


@intrinsic
def vload_masked(typingctx, array, index, mask, mask_index):
    """``array[index : index + lanes]`` where ``mask[mask_index + l] != 0``, zero elsewhere
    (``mask`` a 1-D uint8 array; no bounds check). A masked load: the masked-off elements
    are not read, so they may hold anything, NaN included."""
    if not (isinstance(mask, types.Array) and mask.dtype == types.uint8):
        return None
    vector = _vector_of(array)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), vector_type.as_pointer())
        mask_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        lanes = _lane_mask(builder, mask_data, args[3], vector.lanes)
        load = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vector_type, [pointer.type, ir.IntType(32), lanes.type,
                                          vector_type]),
            f"llvm.masked.load.v{vector.lanes}{_element(vector_type)}.p0")
        return builder.call(load, [pointer, ir.Constant(ir.IntType(32),
                                                        array.dtype.bitwidth // 8),
                                   lanes, ir.Constant(vector_type, None)])

    return vector(array, index, mask, mask_index), codegen


def _first_lanes(builder, count, lanes):
    """``<lanes x i1>``: lane ``l`` is on where ``l < count``."""
    count = builder.sext(count, ir.IntType(64)) if count.type.width < 64 else count
    iota = ir.Constant(ir.VectorType(ir.IntType(64), lanes), list(range(lanes)))
    splat = builder.insert_element(ir.Constant(iota.type, ir.Undefined), count,
                                   ir.Constant(ir.IntType(32), 0))
    splat = builder.shuffle_vector(splat, ir.Constant(iota.type, ir.Undefined),
                                   ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                               [0] * lanes))
    return builder.icmp_signed("<", iota, splat)


@intrinsic
def vload_first(typingctx, array, index, count):
    """``array[index : index + count]`` as a vector whose other lanes are zero, for
    ``0 <= count <= lanes``; the memory after it is not read (a masked load)."""
    if not isinstance(array, types.Array):
        return None
    vector = _vector_of(array)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), vector_type.as_pointer())
        mask = _first_lanes(builder, args[2], vector.lanes)
        load = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vector_type, [pointer.type, ir.IntType(32), mask.type,
                                          vector_type]),
            f"llvm.masked.load.v{vector.lanes}{_element(vector_type)}.p0")
        return builder.call(load, [pointer, ir.Constant(ir.IntType(32),
                                                        array.dtype.bitwidth // 8),
                                   mask, ir.Constant(vector_type, None)])

    return vector(array, index, count), codegen


@intrinsic
def vstore_first(typingctx, array, index, value, count):
    """``array[index : index + count] = value[:count]`` for ``0 <= count <= lanes``; the
    memory after it is neither read nor written (a masked store)."""
    if not isinstance(value, _Vector):
        return None

    def codegen(context, builder, signature, args):
        vector_type = args[2].type
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), vector_type.as_pointer())
        mask = _first_lanes(builder, args[3], vector_type.count)
        store = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [vector_type, pointer.type, ir.IntType(32),
                                            mask.type]),
            f"llvm.masked.store.v{vector_type.count}{_element(vector_type)}.p0")
        builder.call(store, [args[2], pointer, ir.Constant(ir.IntType(32),
                                                           array.dtype.bitwidth // 8), mask])
        return context.get_dummy_value()

    return types.none(array, index, value, count), codegen


@intrinsic
def vsum_lanes(typingctx, src, src_index, dst, dst_index):
    """``dst[dst_index + i] = sum(src[src_index + i * lanes : src_index + (i + 1) * lanes])``
    for ``i < lanes``: the lane sums of ``lanes`` consecutive vectors, as one vector.

    A fixed tree: each level adds the lower and upper halves of every segment of two
    vectors (15 vector additions and 30 shuffles for 16 float32 vectors instead of 240 scalar
    additions); the order never changes, so the result is deterministic."""
    if not (isinstance(src, types.Array) and dst == src):
        return None
    vector = _vector_of(src)

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        lanes = vector.lanes
        align = src.dtype.bitwidth // 8
        src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        index = args[1]
        values = []
        for i in range(lanes):
            offset = builder.add(index, ir.Constant(index.type, i * lanes))
            pointer = builder.bitcast(builder.gep(src_data, [offset]),
                                      vector_type.as_pointer())
            values.append(builder.load(pointer, align=align))
        segment = lanes          # lanes per accumulator's partial sums in each vector
        while len(values) > 1:
            half = segment // 2
            count = lanes // segment   # segments per vector
            low = []
            high = []
            for which in range(2):     # the first vector's segments, then the second's
                for s in range(count):
                    base = which * lanes + s * segment
                    low.extend(range(base, base + half))
                    high.extend(range(base + half, base + segment))
            i32 = ir.IntType(32)
            low_mask = ir.Constant(ir.VectorType(i32, lanes), low)
            high_mask = ir.Constant(ir.VectorType(i32, lanes), high)
            folded = []
            for a, b in zip(values[0::2], values[1::2]):
                folded.append(builder.fadd(builder.shuffle_vector(a, b, low_mask),
                                           builder.shuffle_vector(a, b, high_mask)))
            values = folded
            segment = half
        pointer = builder.bitcast(builder.gep(dst_data, [args[3]]), vector_type.as_pointer())
        builder.store(values[0], pointer, align=align)
        return context.get_dummy_value()

    return types.none(src, src_index, dst, dst_index), codegen


@intrinsic
def vtranspose(typingctx, src, src_index, src_stride, dst, dst_index):
    """The ``lanes x lanes`` block whose row ``r`` is ``src[src_index + r * src_stride :
    ... + lanes]``, transposed into ``dst[dst_index + c * lanes : ... + lanes]`` (row ``c``
    of the result holds element ``c`` of every source row): ``log2(lanes)`` rounds of
    two-vector shuffles, each swapping one bit of the row index with the same bit of the
    column index (no arithmetic: the values move unchanged)."""
    vector = _vector_of(src)
    if _vector_of(dst) != vector:
        return None

    def codegen(context, builder, signature, args):
        vector_type = context.get_value_type(vector)
        lanes = vector_type.count
        src_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        align = src.dtype.bitwidth // 8
        index_type = args[1].type
        rows = []
        for r in range(lanes):
            offset = builder.add(args[1], builder.mul(args[2], ir.Constant(index_type, r)))
            pointer = builder.bitcast(builder.gep(src_data, [offset]), vector_type.as_pointer())
            rows.append(builder.load(pointer, align=align))
        bit = 1
        while bit < lanes:
            mask_type = ir.VectorType(ir.IntType(32), lanes)
            low = [(lanes if c & bit else 0) + (c & ~bit) for c in range(lanes)]
            high = [(lanes if c & bit else 0) + (c | bit) for c in range(lanes)]
            for r in range(lanes):
                if r & bit:
                    continue
                a, b = rows[r], rows[r | bit]
                rows[r] = builder.shuffle_vector(a, b, ir.Constant(mask_type, low))
                rows[r | bit] = builder.shuffle_vector(a, b, ir.Constant(mask_type, high))
            bit *= 2
        index_type = args[4].type
        for c in range(lanes):
            offset = builder.add(args[4], ir.Constant(index_type, c * lanes))
            pointer = builder.bitcast(builder.gep(dst_data, [offset]), vector_type.as_pointer())
            builder.store(rows[c], pointer, align=align)
        return context.get_dummy_value()

    return types.none(src, src_index, src_stride, dst, dst_index), codegen


@intrinsic
def vadd_scalar(typingctx, value, scalar):
    """``value + scalar`` lane by lane (one IEEE addition per lane, as ``x + s`` on
    scalars; ``scalar`` is converted to the vector's element type first)."""
    if not isinstance(value, _Vector) or not isinstance(scalar, types.Float):
        return None

    def codegen(context, builder, signature, args):
        vector_type = args[0].type
        # a float64 scalar that holds a float32 value converts exactly
        element = context.cast(builder, args[1], signature.args[1], value.dtype)
        lane0 = builder.insert_element(ir.Constant(vector_type, ir.Undefined), element,
                                       ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count),
                           [0] * vector_type.count)
        splat = builder.shuffle_vector(lane0, ir.Constant(vector_type, ir.Undefined), mask)
        return builder.fadd(args[0], splat)

    return value(value, scalar), codegen
