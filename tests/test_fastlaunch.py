"""The fast launch path (gpuconv.cuda.fastlaunch) without a GPU: its argument lists against
numba-cuda's own marshalling, for every launch the CUDA path makes on the benchmark layers,
and its choice between the fast path and Numba's dispatcher.

Numba device arrays are real ``DeviceNDArray`` objects over a stand-in allocation (a pointer
and nothing behind it): packing reads only their shape, strides, dtype and pointer, and
numba-cuda's ``_Kernel._prepare_args`` is run on them as it is before every dispatcher
launch. On a GPU the first launch of each kernel repeats that comparison on the real
arguments (``scripts/gpu_check.py`` reports the result)."""

import ctypes
import importlib.util
import pathlib

import numpy as np
import pytest

from conftest import SIMULATOR, numba_cuda_importable

pytestmark = pytest.mark.skipif(SIMULATOR or not numba_cuda_importable(),
                                reason="needs numba-cuda's real driver classes (not the "
                                       "simulator's); no GPU is used")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("launch_cost",
                                                  ROOT / "scripts" / "launch_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LC = _script() if numba_cuda_importable() and not SIMULATOR else None
_OPS = ("conv2d", "local_conv2d", "conv2d_input", "conv2d_weight", "local_conv2d_input",
        "local_conv2d_weight")


def _numba_args(spec, launch, args):
    """numba-cuda's kernel arguments for ``args`` (the dispatcher's flat views included)."""
    return LC.dispatcher_work(LC.NumbaKernel(spec.signature), launch, args)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("op_name", _OPS)
def test_every_launch_packs_as_numba_cuda_does(op_name, dtype):
    """Each benchmark layer at its GPU batch and at a small one (the streaming kernel),
    N-D arrays standing for the kernels' flat parameters, then flat views as the
    dispatcher is given: the fast path's list is numba-cuda's, element by element."""
    from gpuconv import workloads
    from gpuconv.cuda.fastlaunch import FastKernel

    launches = 0
    for layer in workloads.LAYERS.values():
        for batch in (layer.batch_gpu, 4):
            geom = layer.geometry(batch)
            for flat_views in (False, True):
                for spec, shape, args in LC.recorded_launches(op_name, geom, dtype,
                                                              flat_views):
                    fast = FastKernel(None, spec.signature, spec.name)
                    packed = fast._pack(args)
                    assert fast._check(LC.NumbaKernel(spec.signature), args, packed, 0) is None
                    assert [getattr(a, "value", a) for a in packed] == \
                        [getattr(a, "value", a) for a in _numba_args(spec, shape, args)]
                    assert fast._pack(args) == packed  # the second time from the template
                    launches += 1
    assert launches >= 2 * 2 * len(workloads.LAYERS)


def test_the_check_finds_a_difference():
    from numba import types

    from gpuconv.cuda.fastlaunch import FastKernel
    from gpuconv.cuda.spec import KernelSpec

    spec = KernelSpec("k", None, (types.Array(types.float32, 1, "C"), types.int64))
    x = LC.device_array((3, 4), np.float32)
    fast = FastKernel(None, spec.signature, spec.name)
    packed = fast._pack((x, 7))
    numba_kernel = LC.NumbaKernel(spec.signature)
    assert fast._check(numba_kernel, (x, 7), packed, 0) is None
    assert [getattr(a, "value", a) for a in packed] == [0, 0, 12, 4, x.device_ctypes_pointer.value,
                                                        12, 4, 7]
    wrong = list(packed)
    wrong[2] = 11  # another size
    assert "argument 2 is 11" in fast._check(numba_kernel, (x, 7), wrong, 0)
    wrong = list(packed)
    wrong[-1] = ctypes.c_int32(7)  # another scalar type
    assert "c_int" in fast._check(numba_kernel, (x, 7), wrong, 0)
    assert "kernel arguments" in fast._check(numba_kernel, (x, 7), packed[:-1], 0)


def test_arrays_the_fast_path_does_not_take():
    from gpuconv.cuda.fastlaunch import _NotFast, pack_array

    f32 = np.dtype(np.float32)
    x = LC.device_array((2, 3), f32)
    assert pack_array(2, "C", f32, x)[5:] == [2, 3, 12, 4]
    assert pack_array(1, "C", f32, x)[5:] == [6, 4]  # the flat view of a C array
    strided = LC.device_array((2, 3), f32, strides=(24, 4))  # rows padded: not C-contiguous
    assert pack_array(2, "A", f32, strided)[5:] == [2, 3, 24, 4]
    for ndim, layout, dtype, value in [(1, "C", f32, strided),      # no flat view
                                       (2, "C", f32, strided),      # not C-contiguous
                                       (2, "C", np.dtype(np.float64), x),  # another dtype
                                       (3, "C", f32, x),            # another rank
                                       (1, "C", f32, np.zeros(3, np.float32))]:  # host array
        with pytest.raises(_NotFast):
            pack_array(ndim, layout, dtype, value)


class _FakeDispatcher:
    """Numba's dispatcher as the fast path sees it: its one overload, and its own launch
    (recorded) for the arguments the fast path leaves to it."""

    def __init__(self, signature, log):
        self.log = log
        kernel = LC.NumbaKernel(signature)
        function = type("Function", (), {"kernel": "cuda.core kernel"})()
        kernel._codelibrary = type("Library", (), {"get_cufunc": lambda self: function})()
        self.overloads = {tuple(signature): kernel}

    def __getitem__(self, launch):
        return lambda *args: self.log.append(("dispatcher", launch, args))

    def get_regs_per_thread(self):
        return 40


@pytest.fixture
def fast_kernel(monkeypatch):
    from numba import types

    from gpuconv.cuda import fastlaunch

    log = []
    signature = (types.Array(types.float32, 1, "C"), types.Array(types.float32, 1, "C"),
                 types.int64, types.int64)
    monkeypatch.setattr(fastlaunch, "_REASONS", {})
    monkeypatch.setattr(fastlaunch, "_STATE", [True])
    monkeypatch.setattr(fastlaunch, "_CORE_LAUNCH",
                        lambda stream, config, kernel, *args: log.append(
                            ("fast", stream, config, kernel, args)))

    def prepared(self, kernel):
        self._core_stream = ("core stream", self.stream)
        self._config = ("config", self.grid, self.block, self.shared)
        return self._config

    monkeypatch.setattr(fastlaunch._Launch, "_prepared", prepared)
    kernel = fastlaunch.FastKernel(_FakeDispatcher(signature, log), signature, "k_test")
    return kernel, log


def test_launch_goes_fast_after_one_check(fast_kernel):
    kernel, log = fast_kernel
    x, y = LC.device_array((2, 2, 3), np.float32), LC.device_array((12,), np.float32)
    kernel[(4, 1), (32,), "stream", 128](x, y, 5, 6)
    kernel[(4, 1), (32,), "stream", 128](x, y, 5, 6)
    assert [entry[0] for entry in log] == ["fast", "fast"]
    kind, stream, config, function, args = log[0]
    assert stream == ("core stream", "stream") and config == ("config", (4, 1), (32,), 128)
    assert function == "cuda.core kernel"
    assert [getattr(a, "value", a) for a in args] == [
        0, 0, 12, 4, x.device_ctypes_pointer.value, 12, 4,
        0, 0, 12, 4, y.device_ctypes_pointer.value, 12, 4, 5, 6]
    # the scalars' ctypes objects are made once per tuple of values
    assert log[0][4][-1] is log[1][4][-1]
    assert kernel[(4, 1), (32,), "stream", 128] is kernel[(4, 1), (32,), "stream", 128]
    assert kernel.get_regs_per_thread() == 40  # the dispatcher's own attributes


def test_launch_leaves_to_the_dispatcher(fast_kernel):
    from gpuconv.cuda import fastlaunch

    kernel, log = fast_kernel
    x, y = LC.device_array((2, 6), np.float32), LC.device_array((12,), np.float32)
    host = np.zeros(12, np.float32)
    kernel[4, 32, 0](host, y, 5, 6)           # not a Numba device array
    kernel[4, 32, 0](x, y, 5.5, 6)            # not an integer: the dispatcher raises
    kernel[4, 32, 0](x, y, [5], 6)            # not even hashable
    assert [entry[0] for entry in log] == ["dispatcher"] * 3
    assert log[1][2][0].shape == (12,)       # handed a flat view, as its signature wants
    assert fastlaunch.fallback_reasons() == {}
    fastlaunch.set_enabled(False)
    kernel[4, 32, 0](x, y, 5, 6)
    fastlaunch.set_enabled(True)
    kernel[[4], [32], 0](x, y, 5, 6)          # unhashable launch shape
    kernel[4, 32, 0](x, y, 5, 6)
    assert [entry[0] for entry in log] == ["dispatcher"] * 5 + ["fast"]


def test_a_failed_check_sends_the_kernel_to_the_dispatcher(fast_kernel, monkeypatch):
    from gpuconv.cuda import fastlaunch

    kernel, log = fast_kernel
    monkeypatch.setattr(kernel, "_check", lambda *args: "kernel argument 2 is 11 where "
                        "numba-cuda makes 12")
    x, y = LC.device_array((12,), np.float32), LC.device_array((12,), np.float32)
    kernel[4, 32, 0](x, y, 5, 6)
    kernel[4, 32, 0](x, y, 5, 6)
    assert [entry[0] for entry in log] == ["dispatcher", "dispatcher"]
    assert fastlaunch.fallback_reasons() == {"k_test": "kernel argument 2 is 11 where "
                                                       "numba-cuda makes 12"}


def test_a_kernel_the_fast_path_cannot_launch(fast_kernel):
    from gpuconv.cuda import fastlaunch

    kernel, log = fast_kernel
    next(iter(kernel.dispatcher.overloads.values())).debug = True
    x, y = LC.device_array((12,), np.float32), LC.device_array((12,), np.float32)
    kernel[4, 32, 0](x, y, 5, 6)
    assert [entry[0] for entry in log] == ["dispatcher"]
    assert "debugging" in fastlaunch.fallback_reasons()["k_test"]


@pytest.mark.parametrize("word, on", [("0", False), ("off", False), ("1", True), ("", True)])
def test_environment_variable(monkeypatch, word, on):
    from gpuconv.cuda import fastlaunch

    monkeypatch.setattr(fastlaunch, "_STATE", [])
    monkeypatch.setenv(fastlaunch.ENV_VAR, word)
    assert fastlaunch.enabled() is on
    assert fastlaunch.set_enabled(not on) is on
    assert fastlaunch.enabled() is (not on)
    with pytest.raises(TypeError, match="on must be True or False"):
        fastlaunch.set_enabled(1)


def test_flat_views_follow_the_fast_path(monkeypatch):
    from gpuconv.cuda import fastlaunch, launch

    x = LC.device_array((2, 3), np.float32)
    monkeypatch.setattr(launch, "_FLAT_VIEWS_NEEDED", [False])
    monkeypatch.setattr(fastlaunch, "_STATE", [True])
    assert launch._flat(x) is x
    monkeypatch.setattr(fastlaunch, "_STATE", [False])
    assert launch._flat(x).shape == (6,)
    monkeypatch.setattr(fastlaunch, "_STATE", [True])
    monkeypatch.setattr(launch, "_FLAT_VIEWS_NEEDED", [True])  # the simulator
    assert launch._flat(x).shape == (6,)


def test_the_launch_cost_script_runs(capsys):
    """``scripts/launch_cost.py`` (the host work of a launch, dispatcher against fast path)."""
    assert LC.main(["--layers", "deepface-l6", "--rounds", "1", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "local_conv2d_igrad_gemm_f32_k5x5" in out and "sum_slices_f32" in out
    if importlib.util.find_spec("torch") is not None:
        assert "reading one CUDA tensor" in out
        assert LC.torch_property_body() is not None  # PyTorch's source as the script reads it
    rows = LC.measure([("tiny", LC.conv_geometry((2, 3, 6, 6), (3, 3), 4))], rounds=1, calls=1)
    assert {row[1] for row in rows} == set(_OPS)
    assert all(row[4] > 0 and row[5] > 0 for row in rows)


def test_scalars_between_arrays():
    """The list's places when scalars come before and between arrays (the benchmark's
    kernels take their arrays first)."""
    from numba import types

    from gpuconv.cuda.fastlaunch import FastKernel
    from gpuconv.cuda.spec import KernelSpec

    spec = KernelSpec("k", None, (types.int32, types.Array(types.float64, 2, "A"), types.int64,
                                  types.Array(types.float64, 1, "C"), types.uint64))
    x = LC.device_array((3, 4), np.float64, strides=(64, 8))
    y = LC.device_array((2, 5), np.float64)
    args = (-3, x, 2**40, y, 9)
    fast = FastKernel(None, spec.signature, spec.name)
    packed = fast._pack(args)
    assert fast._check(LC.NumbaKernel(spec.signature), args, packed, 0) is None
    assert [getattr(a, "value", a) for a in packed] == [
        -3, 0, 0, 12, 8, x.device_ctypes_pointer.value, 3, 4, 64, 8, 2**40,
        0, 0, 10, 8, y.device_ctypes_pointer.value, 10, 8, 9]
    assert [type(a) for a in (packed[0], packed[10], packed[-1])] == [
        ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64]


# --------------------------------------------------------------------------------------------
# device views: the callers' arrays without Numba device array objects
# --------------------------------------------------------------------------------------------

class _CallerArray:
    """A caller's GPU array as gpuconv sees one: its array interface only."""

    def __init__(self, shape, dtype, strides=None):
        LC._NEXT_PTR[0] += 1 << 24
        self.ptr = LC._NEXT_PTR[0]
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "strides": strides, "typestr": np.dtype(dtype).str,
            "data": (self.ptr, False), "version": 3, "stream": None}


def test_a_view_packs_as_a_numba_array_of_the_same_memory():
    from gpuconv.cuda.fastlaunch import DeviceView, pack_array

    f16 = np.dtype(np.float16)
    numba_array = LC.device_array((2, 3, 4), f16)
    view = DeviceView(numba_array.device_ctypes_pointer.value, (2, 3, 4), f16)
    for ndim, layout in ((1, "C"), (3, "C"), (3, "A")):
        assert pack_array(ndim, layout, f16, view) == pack_array(ndim, layout, f16, numba_array)
    strided = LC.device_array((2, 3), f16, strides=(16, 2))
    strided_view = DeviceView(strided.device_ctypes_pointer.value, (2, 3), f16, (16, 2))
    assert pack_array(2, "A", f16, strided_view) == pack_array(2, "A", f16, strided)
    assert not strided_view.is_c_contiguous() and view.is_c_contiguous()
    with pytest.raises(ValueError, match="cannot view"):
        strided_view.reshape(6)
    flat = view.reshape(24)
    assert (flat.shape, flat.strides, flat.ptr, flat.size) == ((24,), (2,), view.ptr, 24)
    assert view.reshape((1, 1, 24)).shape == (1, 1, 24)
    cai = strided_view.__cuda_array_interface__
    assert cai["strides"] == (16, 2) and cai["typestr"] == "<f2" \
        and cai["data"][0] == strided_view.ptr
    assert view.__cuda_array_interface__["strides"] is None  # C-contiguous
    again = DeviceView.from_interface(cai, owner="caller")
    assert (again.shape, again.strides, again.dtype, again.owner) == ((2, 3), (16, 2), f16,
                                                                        "caller")
    # any stride on a length-1 axis: still C-contiguous, as the public layer judges it
    # (an interface may give one that C order would not)
    unit = DeviceView(view.ptr, (2, 1, 12), f16, (24, 2, 2))
    assert unit.is_c_contiguous() and unit.reshape(24).strides == (2,)
    assert pack_array(3, "C", f16, unit)[:5] == pack_array(3, "C", f16, view)[:5]


@pytest.mark.parametrize("op_name", _OPS)
def test_a_call_on_device_arrays_launches_on_the_callers_memory(monkeypatch, op_name):
    """The CUDA path of one call, as far as it goes without a driver: the caller's arrays,
    the output and the scratch reach the kernels as views of the memory the caller and the
    allocator gave (pointers checked), never as Numba device arrays."""
    from gpuconv import ops
    from gpuconv.conv import _Operand
    from gpuconv.cuda import fastlaunch, launch
    from gpuconv.cuda.fastlaunch import DeviceView, FastKernel

    op = ops.OPS[op_name]
    geom = LC.conv_geometry((3, 4, 9, 9), (3, 3), 32, padding=1)
    dtype = np.dtype(np.float32)
    shapes = {"forward": (geom.input_shape, op.weight_shape(geom), op.bias_shapes(geom)[-1]),
              "input_grad": (geom.output_shape, op.weight_shape(geom)),
              "weight_grad": (geom.input_shape, geom.output_shape)}[op.kind]
    callers = [_CallerArray(shape, dtype) for shape in shapes]
    operands = [_Operand(a, a.__cuda_array_interface__["shape"], dtype, True,
                         cai=a.__cuda_array_interface__) for a in callers]
    allocated = []

    def allocate(template, shape, dt, stream):
        allocated.append(_CallerArray(shape, dt))
        return allocated[-1]

    monkeypatch.setattr(launch, "_check_device_memory", lambda *a, **k: None)
    monkeypatch.setattr(launch, "_stream_of", lambda *a, **k: 0)
    monkeypatch.setattr(launch, "_allocate_like", allocate)
    log = []
    with LC.recording(log):
        assert fastlaunch.enabled() and launch._views()
        out = launch._run_gpu_on_device(op, operands, geom, launch._Plan(op, operands, geom),
                                        device=0)
    assert out is allocated[0]
    assert tuple(out.__cuda_array_interface__["shape"]) == tuple(op.output_shape(geom))
    pointers = {a.ptr for a in callers + allocated}
    for spec, shape, args in log:
        arrays = [a for a in args if not isinstance(a, int)]
        assert arrays and all(type(a) is DeviceView for a in arrays)
        assert {a.ptr for a in arrays} <= pointers
        packed = FastKernel(None, spec.signature, spec.name)._pack(args)
        assert all(isinstance(v, (int, ctypes._SimpleCData)) for v in packed)
    first_arrays = [a for a in log[0][2] if not isinstance(a, int)]
    assert [a.ptr for a in first_arrays[:len(callers)]] == [a.ptr for a in callers]
    if op.kind == "forward":  # the output follows the operands
        assert first_arrays[len(callers)].ptr == out.ptr
    # with the fast path off, the same call makes Numba arrays (needs the driver: not here)
    monkeypatch.setattr(fastlaunch, "_STATE", [False])
    assert not launch._views()


def test_internals_missing_at_the_first_launch_send_the_kernel_to_the_dispatcher(fast_kernel):
    """A numba-cuda whose compiled kernel lacks what every fast launch reads is found at
    the first launch, not by an error on each call."""
    from gpuconv.cuda import fastlaunch

    kernel, log = fast_kernel
    overload = next(iter(kernel.dispatcher.overloads.values()))
    overload._codelibrary = type("Library", (), {"get_cufunc": lambda self: object()})()
    x, y = LC.device_array((12,), np.float32), LC.device_array((12,), np.float32)
    kernel[4, 32, 0](x, y, 5, 6)
    kernel[4, 32, 0](x, y, 5, 6)
    assert [entry[0] for entry in log] == ["dispatcher", "dispatcher"]
    assert "AttributeError" in fastlaunch.fallback_reasons()["k_test"]


# --------------------------------------------------------------------------------------------
# PyTorch's CUDA tensors: read without PyTorch's array-interface property, one stream query
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixed", [False, True])
def test_a_call_on_torch_tensors_asks_for_the_stream_once(monkeypatch, mixed):
    """A call on PyTorch CUDA tensors (stand-ins over CPU memory) asks for PyTorch's current
    stream once, for the first operand: the others share it (PyTorch's current stream
    belongs to the GPU, and the call's operands are on one GPU). An operand of another
    library is asked for its own. The kernels get the tensors' memory."""
    torch = pytest.importorskip("torch")
    from test_torch_operands import _TorchCudaStandIn

    from gpuconv import conv as _conv
    from gpuconv import ops
    from gpuconv.cuda import launch
    from gpuconv.cuda.fastlaunch import DeviceView

    monkeypatch.setattr(_conv._Torch, "tensor", None)
    _conv._Torch.seen()
    monkeypatch.setattr(_conv._Torch, "tensor", _TorchCudaStandIn)
    op = ops.OPS["conv2d"]
    geom = LC.conv_geometry((3, 16, 9, 9), (3, 3), 32, padding=1)
    tensors = [torch.zeros(shape) for shape in (geom.input_shape, op.weight_shape(geom),
                                                 op.bias_shapes(geom)[-1])]
    callers = [_TorchCudaStandIn(t) for t in tensors]
    if mixed:
        callers[1] = _CallerArray(op.weight_shape(geom), np.float32)
    operands = [_conv._operand(c, name) for c, name in zip(callers, ("x", "weight", "bias"))]
    asked = []
    monkeypatch.setattr(launch, "_check_device_memory", lambda *a, **k: None)
    monkeypatch.setattr(launch, "_stream_of", lambda obj, *a, **k: asked.append(obj) or 0)
    plan = launch._Plan(op, operands, geom)
    assert plan.own_stream == (True, not mixed, True)
    log = []
    with LC.recording(log):
        out = launch._run_gpu_on_device(op, operands, geom, plan, device=0)
    assert asked == ([callers[0], callers[1]] if mixed else [callers[0]])
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == op.output_shape(geom)
    arrays = [a for a in log[0][2] if not isinstance(a, int)]
    assert all(type(a) is DeviceView for a in arrays)
    expected = [tensors[0].data_ptr(), callers[1].ptr if mixed else tensors[1].data_ptr(),
                tensors[2].data_ptr(), out.data_ptr()]
    assert [a.ptr for a in arrays[:4]] == expected


class _FakeTorch:
    """What :func:`gpuconv.cuda.launch._torch_raw_stream` reads of PyTorch: a current
    stream per GPU, a raw reader that may disagree, streams made current by a context."""

    def __init__(self, raw=True, disagree_on_side=False, fails=False):
        fake = self
        self.current = {0: 0}

        class Stream:
            def __init__(self, device=None):
                self.cuda_stream = 0x5000

        class Cuda:
            pass

        self.cuda = Cuda()
        self.cuda.Stream = Stream
        self.cuda.current_stream = lambda device: type("S", (), {"cuda_stream":
                                                                 fake.current[0]})()

        @__import__("contextlib").contextmanager
        def stream(s):
            saved, fake.current[0] = fake.current[0], s.cuda_stream
            try:
                yield
            finally:
                fake.current[0] = saved

        self.cuda.stream = stream

        def read(device):
            if fails:
                raise RuntimeError("no such thing")
            return fake.current[device] + (1 if disagree_on_side and fake.current[0] else 0)

        self._C = type("C", (), {"_cuda_getCurrentRawStream": staticmethod(read)})() \
            if raw else object()


@pytest.mark.parametrize("case, note", [
    ({}, None),
    ({"raw": False}, "is missing"),
    ({"disagree_on_side": True}, "differs from torch.cuda.current_stream"),
    ({"fails": True}, "RuntimeError: no such thing")])
def test_the_raw_stream_is_used_only_if_it_is_pytorchs_current_stream(monkeypatch, case, note):
    from gpuconv.cuda import launch

    monkeypatch.setattr(launch, "_TORCH_STREAM_NOTE", [])
    fake = _FakeTorch(**case)
    raw = launch._torch_raw_stream(fake, "cuda:0", 0)
    assert (raw is None) == (note is not None)
    if note is None:
        assert launch._TORCH_STREAM_NOTE == [] and raw is fake._C._cuda_getCurrentRawStream
    else:
        assert note in launch._TORCH_STREAM_NOTE[0]
    # the stream a call reads follows the reader chosen: raw, or torch.cuda.current_stream
    monkeypatch.setitem(__import__("sys").modules, "torch", fake)
    monkeypatch.setattr(launch, "_TORCH_STREAM_READER", [raw])
    tensor = type("T", (), {"device": "cuda:0"})()
    fake.current[0] = 0x77
    assert launch._torch_stream(tensor, 0) == 0x77
    assert launch._torch_stream(tensor, None) == 0x77  # no ordinal: PyTorch's own function


def test_a_kernel_spec_hashes_by_its_name():
    """Every launch looks its kernel up by its spec (``spec.compiled``'s cache): the hash is
    the name's, not the signature's Numba types' (a Python method each, microseconds a
    launch); equality still compares every field."""
    from gpuconv.cuda import launch, spec

    geom = LC.conv_geometry((8, 16, 16, 16), (3, 3), 16, padding=1)
    kernel = launch._CONFIG["conv2d"](geom, np.dtype(np.float32)).kernel
    assert hash(kernel) == hash(kernel.name)
    other = kernel._replace(signature=kernel.signature[:-1])
    assert hash(other) == hash(kernel) and other != kernel
    assert len({kernel, other}) == 2
    assert isinstance(kernel, spec.KernelSpec)


def test_the_call_cost_script_runs_and_restores_what_it_patched(capsys):
    """``scripts/call_cost.py``: whole calls on PyTorch CUDA tensor stand-ins, the driver's
    parts stood in for; everything it patched is back afterwards."""
    pytest.importorskip("torch")
    from gpuconv import conv
    from gpuconv.cuda import launch, spec

    sys_path = list(__import__("sys").path)
    module_spec = importlib.util.spec_from_file_location("call_cost",
                                                         ROOT / "scripts" / "call_cost.py")
    call_cost = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(call_cost)
    __import__("sys").path[:] = sys_path
    before = (conv.select_device, launch._stream_of, spec.compiled, conv._Torch.tensor)
    assert call_cost.main(["--rounds", "1", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("conv2d, bias", "conv2d, no bias", "local_conv2d, bias",
                  "local_conv2d, no bias"):
        assert label in out
    assert (conv.select_device, launch._stream_of, spec.compiled, conv._Torch.tensor) == before


def test_scratch_of_a_pytorch_operand_has_the_asked_numpy_dtype():
    """``_allocate_like`` on a PyTorch template: PyTorch's dtype of each NumPy dtype asked
    for (float16's partial sums are float32), looked up once and then from a table; and
    ``dtype_code`` names the three dtypes and refuses others."""
    torch = pytest.importorskip("torch")
    from gpuconv.cuda import launch, spec

    template = torch.zeros(2)
    for asked, expected in ((np.float16, torch.float16), (np.dtype(np.float32), torch.float32),
                            (np.float64, torch.float64), (np.float32, torch.float32)):
        made = launch._allocate_like(template, (3, 2), asked, 0)
        assert made.dtype is expected and tuple(made.shape) == (3, 2)
        assert launch._torch_dtype(asked) is expected
    assert [spec.dtype_code(d) for d in (np.float16, "float32", np.dtype(np.float64))] == [
        "f16", "f32", "f64"]
    with pytest.raises(KeyError):
        spec.dtype_code(np.int32)


def test_every_launch_fits_cudas_block_limits():
    """A block is at most 1024 x 1024 x 64 threads and 1024 in all, on every NVIDIA GPU: a
    launch beyond that fails with CUDA_ERROR_INVALID_VALUE (the simulator does not check)."""
    import math

    from gpuconv import workloads

    geometries = [LC.conv_geometry((1, 1, 40, 70), (5, 5), 1),      # batch1_one_channel
                  LC.conv_geometry((16, 10, 64, 128), (3, 3), 2, padding=1)]
    geometries += [layer.geometry(b) for layer in workloads.LAYERS.values() for b in (1, 4, 16)]
    for geom in geometries:
        for op_name in _OPS:
            for dtype in (np.float32, np.float16, np.float64):
                try:
                    launches = LC.recorded_launches(op_name, geom, dtype)
                except ValueError:  # refused with a clear error: fine
                    continue
                for spec, launch, _ in launches:
                    block = tuple(launch[1]) if isinstance(launch[1], (tuple, list)) \
                        else (launch[1],)
                    block += (1,) * (3 - len(block))
                    assert block[0] <= 1024 and block[1] <= 1024 and block[2] <= 64 \
                        and math.prod(block) <= 1024, (spec.name, geom, block)


def test_numba_arrays_on_the_default_stream_share_one_stream_object(monkeypatch):
    """numba-cuda makes a new default-stream object per ``cuda.default_stream()``, and
    streams compare by identity: a call on Numba arrays (stream 0) must reuse one, or the
    fast launch's per-launch-shape cache misses on every call."""
    from gpuconv.cuda import launch

    class NumbaArray:
        __cuda_ndarray__ = True
        stream = 0

    monkeypatch.setattr(launch.cuda, "default_stream", lambda: object())
    monkeypatch.setattr(launch, "simulator_enabled", lambda: False)
    monkeypatch.setattr(launch, "_DEFAULT_STREAM", [])
    monkeypatch.setattr(launch, "_STREAMS", {})
    first = launch._stream_of(NumbaArray())
    assert launch._stream_of(NumbaArray()) is first
    assert launch._numba_stream(0, 0) is first and launch._numba_stream(None) is first
    own = object()
    array = NumbaArray()
    array.stream = own  # an array bound to a stream of its own keeps it
    assert launch._stream_of(array) is own


def test_a_numba_array_on_another_gpu_is_launched_there(monkeypatch):
    """A Numba device array says its GPU through its memory's context (it has no dlpack
    device): a call on arrays of GPU 1 while GPU 0 is current runs on GPU 1, and one mixing
    GPUs is refused, instead of launching GPU 1's pointers in GPU 0's context."""
    import contextlib
    from types import SimpleNamespace

    from gpuconv.cuda import launch

    def numba_array(device):
        return SimpleNamespace(__cuda_ndarray__=True, gpu_data=SimpleNamespace(
            context=SimpleNamespace(device=SimpleNamespace(id=device))))

    entered, ran = [], []

    class Gpus:
        def __getitem__(self, device):
            entered.append(device)
            return contextlib.nullcontext()

    monkeypatch.setattr(launch, "simulator_enabled", lambda: False)
    monkeypatch.setattr(launch, "_current_device_id", lambda: 0)
    monkeypatch.setattr(launch.cuda, "gpus", Gpus(), raising=False)
    monkeypatch.setattr(launch, "_run_gpu_on_device",
                        lambda op, operands, geom, plan, device, timer: ran.append(device))
    op = SimpleNamespace(name="conv2d")
    operands = [SimpleNamespace(obj=numba_array(1)), SimpleNamespace(obj=numba_array(1))]
    assert launch._device_id(operands[0].obj) == 1
    launch._run_gpu(op, operands, None, None)
    assert ran == [1] and entered == [1]
    with pytest.raises(ValueError, match="same GPU, got devices \\[0, 1\\]"):
        launch._run_gpu(op, [SimpleNamespace(obj=numba_array(0)), operands[0]], None, None)
    assert launch._device_id(SimpleNamespace(__cuda_ndarray__=True)) is None


def test_a_tensor_subclass_is_pytorchs(monkeypatch):
    """A torch.Tensor subclass defined outside torch (torchvision's image tensors, a user's
    own) is PyTorch's: its work goes on PyTorch's current stream and the result comes back
    a tensor, not as a Numba array on the default stream."""
    torch = pytest.importorskip("torch")
    import types

    from gpuconv.cuda import launch

    module = types.ModuleType("userlib")
    exec("import torch\nclass Image(torch.Tensor):\n    pass", module.__dict__)
    x = torch.zeros(2).as_subclass(module.Image)
    assert type(x).__module__ == "userlib" and launch._library(x) == "torch"
    monkeypatch.setattr(launch, "_torch_stream", lambda obj, device: 1234)
    monkeypatch.setattr(launch, "_numba_stream", lambda handle, device=None: handle)
    assert launch._stream_of(x, 0, {"shape": (2,), "version": 2}) == 1234
    assert launch._library(np.zeros(2)) == "numba"
