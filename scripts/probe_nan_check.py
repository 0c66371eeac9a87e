"""GPU diagnostic: does the engine's workspace probe (``workspace.measure_cuda``, run by every CUDA ``LLM`` at
construction) ever sample from non-finite logits, and which op makes them first?

On an H200 chapter 3's engine (Llama-2-7B shape, random weights, ``transfer.build_engine(decode=True)``) once
failed inside the probe with torch.multinomial's device assert ("probability tensor contains either inf, nan
or element < 0"); the same code passed an hour earlier on another H200, and on CPU the probe reads no
memory it did not write (tests/test_workspace_probe.py). Each run here is a fresh process (as the failing
one was), built exactly as chapter 3 builds it (its gpu profile's ``build_engine``), in one of these modes:

* ``engine``: the whole engine construction, unchanged (the failing call): counts device asserts;
* ``guard``: the construction up to and including the probe (``LLM._size_memory``), sampling checked first
  (a non-finite logits row -> a one-line report of the step instead of the assert), nothing else changed;
* ``watch``: as ``guard``, every forward op checked after it runs (synchronised): the first op that turns
  finite inputs into a non-finite output;
* ``poison``: as ``watch``, with every uninitialised tensor and the arena NaN-filled at allocation.

    python scripts/probe_nan_check.py                                   # 3 fresh processes per mode
    python scripts/probe_nan_check.py --modes guard --repeats 1 --sanitizer initcheck

``--sanitizer initcheck|memcheck`` runs each child under ``compute-sanitizer`` (caching allocator off, so
that a read of never-written device memory is reported: ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``; the probe then
captures no CUDA graph) and keeps the tail of its report. ``--out DIR`` also writes the results as
``DIR/probe_nan_check.json``.
Prints one line per run and a summary; exits 1 when any run saw non-finite logits or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = ("engine", "guard", "watch", "poison")


def child(mode: str, shape: str, graphs: bool) -> dict:
    """One run in this process (the parent starts a fresh one per run); ``graphs=False``: no CUDA-graph
    capture (under compute-sanitizer, whose runs turn the caching allocator off, which capture needs)."""
    import dataclasses

    import torch

    from morphbook.experiments import transfer
    from morphlib.engine import nancheck
    from morphlib.engine.llm import LLM
    from morphlib.errors import MorphError

    cfg = transfer.Config.for_profile("gpu")
    device = torch.device("cuda")
    if mode == "engine":
        if not graphs:
            return {"ok": False, "error": "mode engine is the construction unchanged (graphs on): not with --sanitizer"}
        transfer.build_engine(shape, cfg, device, decode=True).close()
        return {"ok": True}
    built = {}
    real = transfer.LLM
    transfer.LLM = lambda source, econf: built.update(source=source, econf=econf)  # build_engine's arguments
    try:
        transfer.build_engine(shape, cfg, device, decode=True)
    finally:
        transfer.LLM = real
    llm = LLM.__new__(LLM)  # LLM.__init__'s steps up to and including the probe
    llm._check_config(dataclasses.replace(built["econf"], cuda_graphs=graphs))
    llm._start_memory_accounting()
    _, hf_config = llm._read_model(built["source"], None)
    llm._plan_layout(None)
    poison = nancheck.poisoned() if mode == "poison" else contextlib.nullcontext()
    try:
        with poison, nancheck.watch(ops=mode != "guard") as w:
            llm._size_memory(hf_config)
    except MorphError as exc:
        return {"ok": False, "error": str(exc), "first_op": w.first, "steps": w.steps}
    finally:
        if llm._release is not None:
            llm._release()
    return {"ok": True, "steps": w.steps, "ops_checked": w.ops, "first_op": w.first,
            "workspace_bytes": llm.workspace_measured["bytes"]}


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if shutil.which("nvidia-smi"):
        q = ("name,driver_version,memory.used,ecc.errors.corrected.volatile.total,"
             "ecc.errors.uncorrected.volatile.total,retired_pages.pending")
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = (r.stdout or r.stderr).strip()
    return env


def run_child(mode: str, shape: str, sanitizer: str | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--shape", shape] + (["--no-graphs"] if sanitizer else [])
    env = dict(os.environ)
    if sanitizer:
        tool = shutil.which("compute-sanitizer") or next(
            (str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/compute-sanitizer"))), None)
        if tool is None:
            return {"ok": False, "error": "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"}
        cmd = [tool, "--tool", sanitizer, "--print-limit", "20", "--target-processes", "all"] + cmd
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"ok": False}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if r.returncode != 0 or not lines:
        out.update(ok=False, rc=r.returncode)
        text = r.stderr + r.stdout
        out["assert"] = "probability tensor contains" in text
        out.setdefault("error", text.strip().splitlines()[-1] if text.strip() else "no output")
    if sanitizer:
        out["sanitizer_tail"] = (r.stdout + r.stderr)[-6000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per mode")
    ap.add_argument("--shape", default="llama-2-7b")
    ap.add_argument("--sanitizer", choices=("initcheck", "memcheck"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument("--out", help="folder for probe_nan_check.json")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--no-graphs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.shape, graphs=not args.no_graphs)), flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {unknown}: choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: this diagnostic needs a CUDA GPU (the probe's CPU check is tests/test_workspace_probe.py)",
              file=sys.stderr)
        return 2
    report = {"environment": environment(), "shape": args.shape, "sanitizer": args.sanitizer, "runs": []}
    print(json.dumps(report["environment"]))
    for mode in modes:
        for i in range(args.repeats):
            r = {"mode": mode, "run": i, **run_child(mode, args.shape, args.sanitizer, args.timeout)}
            report["runs"].append(r)
            shown = {k: v for k, v in r.items() if k != "sanitizer_tail"}
            print(json.dumps(shown), flush=True)
            if args.sanitizer:
                print(r.get("sanitizer_tail", ""), flush=True)
    bad = [r for r in report["runs"] if not r.get("ok")]
    print(f"{len(report['runs'])} runs, {len(bad)} with non-finite logits or a failure"
          + "".join(f"\n  {r['mode']} #{r['run']}: {r.get('error')} (first op: {r.get('first_op')})" for r in bad))
    if args.out:
        path = Path(args.out) / "probe_nan_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
