"""Print the predicted H200 table of every CUDA kernel the dispatcher picks on the default
benchmark suite: resources from ``ptxas`` (sm_90), occupancy, waves, global sectors and
lines from the kernels' own staging addresses, shared-memory wavefronts, DRAM bytes per FMA,
the predicted bound, time and share of the roofline (see :mod:`gpuconv.cuda.predict`).

No GPU needed, and nothing in the table is measured: it is the design on paper that a GPU
run then checks.

    PYTHONPATH=. python scripts/kernel_table.py [--layers NAME ...] [--suite default|full]
                                                [--dtype float32|float16] [--batch N]
                                                [--no-gradients] [--no-ptxas]
                                                [--local-gradients] [--stream-search]

``--candidates`` prints, for each layer and forward operation, every kernel the dispatcher
weighs (its pick marked) with its predicted time: the choices the acceptance run's
``candidates`` phase then times side by side.

``--stream-search`` prints, for each layer at a batch of 1 to 8 (default 8), the
streaming local forward's pick beside the model's fastest launch of the same kernel
(:func:`gpuconv.cuda.predict.stream_search`), each predicted with the launch bounds'
registers and with ptxas's.

``--local-gradients`` prints only the local_conv2d gradient kernels (the batched GEMMs and
the weight gradient's slice sum), then each layer's predicted local backward beside the
unfold + einsum autograd backward measured on the first H200 run.
"""

import argparse
import functools
import sys


def main(argv=None):
    from gpuconv import bench, workloads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", choices=tuple(workloads.LAYERS), metavar="NAME",
                        help="these layers instead of the suite")
    parser.add_argument("--suite", choices=tuple(bench.SUITES), default="default")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="this batch instead of each layer's GPU batch")
    parser.add_argument("--no-gradients", action="store_true",
                        help="only the forward kernels (and the split-K sum)")
    parser.add_argument("--local-gradients", action="store_true",
                        help="only the local_conv2d gradient kernels, and the predicted local "
                        "backward against unfold + einsum")
    parser.add_argument("--candidates", action="store_true",
                        help="every forward kernel the dispatcher weighs, the pick marked")
    parser.add_argument("--stream-search", action="store_true",
                        help="the streaming local forward's pick beside the model's fastest "
                        "launch (batch 1 to 8, default 8)")
    parser.add_argument("--no-ptxas", action="store_true",
                        help="registers from the launch bounds instead of ptxas (faster)")
    args = parser.parse_args(argv)

    import numpy as np

    from gpuconv.cuda import predict
    from gpuconv.cuda import ptx as _cuda_ptx

    ptxas = None
    if not args.no_ptxas:
        if _cuda_ptx.find_ptxas() is None:
            parser.error("ptxas not found (pip install nvidia-cuda-nvcc), or pass --no-ptxas")

        @functools.lru_cache(maxsize=None)
        def ptxas(spec, shared_bytes=0):
            return _cuda_ptx.ptxas_info(_cuda_ptx.compile_ptx(spec, (9, 0)), "sm_90",
                                        spec.name, dynamic_smem=shared_bytes)

    names = args.layers or bench.SUITES[args.suite]
    if args.candidates:
        print(candidate_table(names, np.dtype(args.dtype), args.batch, ptxas))
        return 0
    if args.stream_search:
        batch = 8 if args.batch is None else args.batch
        if not 1 <= batch <= 8:
            parser.error(f"--stream-search takes a batch of 1 to 8, got {batch}")
        print(stream_search_table(names, np.dtype(args.dtype), batch, ptxas))
        return 0
    rows = []
    for name in names:
        if args.local_gradients:
            rows += predict.local_gradient_rows(workloads.LAYERS[name], np.dtype(args.dtype),
                                                ptxas=ptxas, batch=args.batch)
            continue
        rows += predict.layer_rows(workloads.LAYERS[name], np.dtype(args.dtype),
                                   ptxas=ptxas, gradients=not args.no_gradients,
                                   batch=args.batch)
    print(f"Predicted on {predict.H200.name} ({predict.H200.sms} SMs, "
          f"{predict.H200.fp32_flops / 1e12:.1f} TFLOP/s, "
          f"{predict.H200.copy_bytes_per_s / 1e12:.2f} TB/s copy), {args.dtype}, "
          f"{'GPU batches' if args.batch is None else f'batch {args.batch}'}; registers from "
          f"{'the launch bounds' if ptxas is None else 'ptxas sm_90'}. Not measured.\n")
    print(predict.format_rows(rows))
    if args.local_gradients and args.batch is None:
        print("\nPredicted local backward (kernel time) against the unfold + einsum autograd "
              "backward measured on the first H200 run (whole calls, float32):\n")
        print(predict.format_backward_rows(predict.local_backward_rows(
            [workloads.LAYERS[name] for name in names], np.dtype(args.dtype), ptxas=ptxas)))
    return 0


def candidate_table(names, dtype, batch, ptxas):
    """Markdown: each layer's forward candidates (:func:`gpuconv.cuda.kernels.forward_candidates`)
    with their predicted times, the dispatcher's pick marked and the fastest predicted."""
    from gpuconv import workloads
    from gpuconv.cuda import kernels, predict

    lines = ["| layer | op | kernel | picked | regs | blocks | bound | predicted ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        layer = workloads.LAYERS[name]
        geom = workloads.gpu_geometry(layer, batch)
        for op in ("conv2d", "local_conv2d"):
            picked = (kernels.conv2d_config if op == "conv2d"
                      else kernels.local_conv2d_forward_config)(geom, dtype)
            timed = []
            for config in kernels.forward_candidates(op, geom, dtype):
                rows = predict.forward_rows(name, geom, dtype, config, ptxas)
                times = [r.time_s for r in rows]
                ms = None if None in times else 1e3 * sum(times)
                timed.append((ms, config.kernel.name))
                lines.append(f"| {name} (N={geom.batch}) | {op} | `{config.kernel.name}` | "
                             f"{'yes' if config == picked else ''} | {rows[0].registers} | "
                             f"{rows[0].blocks} | {rows[0].bound} | "
                             f"{'-' if ms is None else format(ms, '.3f')} |")
            best = min((t for t in timed if t[0] is not None), default=None)
            if best and best[1] != picked.kernel.name:
                lines.append(f"| | | fastest predicted: `{best[1]}` | | | | | |")
    return "\n".join(lines)


def stream_search_table(names, dtype, batch, ptxas):
    """Markdown: each layer's streaming pick and the model's fastest launch
    (:func:`gpuconv.cuda.predict.stream_search`), predicted with the launch bounds'
    registers and, where ``ptxas`` is given, with ptxas's."""
    from gpuconv import workloads
    from gpuconv.cuda import local_stream, predict

    def short(config):
        return config.kernel.name.split("_", 4)[-1]  # past local_conv2d_stream_<dtype>_

    def times(name, geom, config):
        bounds = predict.forward_row(name, geom, dtype, config).time_s * 1e3
        if ptxas is None:
            return f"{bounds:.3f} ms", bounds, None
        info = ptxas(config.kernel)
        ms = predict.forward_row(name, geom, dtype, config, info).time_s * 1e3
        spills = ", spills" if info.spill_stores or info.spill_loads else ""
        return f"{bounds:.3f} / {ms:.3f} ms ({info.registers} regs{spills})", bounds, ms

    how = "bounds" if ptxas is None else "bounds / ptxas"
    lines = [f"| layer (N = {batch}) | pick | predicted ({how}) | the model's fastest launch "
             f"| predicted ({how}) | pick / fastest ({how}) |", "|---|---|---|---|---|---|"]
    for name in names:
        layer = workloads.LAYERS[name]
        geom = workloads.gpu_geometry(layer, batch)
        pick = local_stream.local_stream_config(geom, dtype)
        best = predict.stream_search(geom, dtype)[0][1]
        p_text, p_bounds, p_ms = times(name, geom, pick)
        b_text, b_bounds, b_ms = times(name, geom, best)
        ratio = f"{p_bounds / b_bounds:.2f}x"
        if p_ms is not None:
            ratio += f" / {p_ms / b_ms:.2f}x"
        lines.append(f"| {layer.short_title} | `{short(pick)}` | {p_text} | `{short(best)}` | "
                     f"{b_text} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
