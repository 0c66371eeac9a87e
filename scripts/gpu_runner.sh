#!/usr/bin/env bash
# Run every chapter on the GPU profile and pack the results into ONE archive.
#
#   bash scripts/gpu_runner.sh [ARCHIVE] [extra scripts/run_chapters.py options, e.g. --chapters transfer,overlap]
#
# ARCHIVE defaults to $OUT/gpu-results.tar.gz when $OUT is set. Needs python3 with this project's
# packages (torch with CUDA, transformers, papermill, jupytext, ipykernel, altair ...) and the model in
# the morphlib cache ($MORPHLIB_CACHE). Chapters run with papermill, profile=gpu, results_root=results,
# from the repository root; a failing chapter does not stop the others, but the exit status is
# non-zero at the end. The archive holds results/ plus _build/gpu-run/ (executed notebooks, run.log,
# status.json, failures.txt, env.txt): untar it in the repository root and `git add results/`.
# Set MORPHBOOK_DEADLINE_S to stop the chapters in time and still get the archive (see below).
set -uo pipefail

cd "$(dirname "$0")/.."
archive="${1:-}"
[ $# -gt 0 ] && shift
if [ -z "$archive" ]; then
  if [ -n "${OUT:-}" ]; then archive="$OUT/gpu-results.tar.gz"; else
    echo "usage: bash scripts/gpu_runner.sh ARCHIVE.tar.gz (or set \$OUT)" >&2; exit 2; fi
fi
case "$archive" in /*) ;; *) archive="$PWD/$archive" ;; esac
mkdir -p "$(dirname "$archive")"

run_dir=_build/gpu-run
rm -rf "$run_dir"
mkdir -p "$run_dir/executed" results
log="$run_dir/run.log"

# No model hub on the GPU machines: never wait on the network.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  python3 - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "papermill", "jupytext", "ipykernel", "altair"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING", type(exc).__name__)
try:
    import torch
    print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception:
    pass
PY
} > "$run_dir/env.txt" 2>&1
cat "$run_dir/env.txt"

start=$(date +%s)
# MORPHBOOK_DEADLINE_S: stop the chapters after that many seconds (SIGINT) and still pack what finished,
# for machines whose calls have a hard limit (a chapter writes summary.json last: no half results).
deadline=()
[ -n "${MORPHBOOK_DEADLINE_S:-}" ] && deadline=(timeout -s INT "$MORPHBOOK_DEADLINE_S")
"${deadline[@]}" python3 scripts/run_chapters.py --profile gpu --results-root results --out-dir "$run_dir/executed" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "deadline: stopped after ${MORPHBOOK_DEADLINE_S} s; packing what finished" | tee -a "$log"
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$log"

python3 - "$run_dir" <<'PY' || true
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
try:
    rows = json.loads((d / "executed" / "status.json").read_text())["chapters"]
except (OSError, ValueError, KeyError):
    rows = [{"chapter": "all", "status": "failed", "error": "run_chapters.py wrote no status.json"}]
bad = [f"{r['chapter']}: {r['status']} {r.get('error') or ''}".strip() for r in rows if r["status"] != "ok"]
(d / "failures.txt").write_text("\n".join(bad) + ("\n" if bad else ""))
PY
python3 -m morphlib.stale --results results 2>&1 | tee -a "$log" || true

tar -czf "$archive" results "$run_dir" || { echo "error: could not write $archive" >&2; exit 1; }
echo "archive: $archive ($(du -h "$archive" | cut -f1)); chapters exit status $rc" | tee -a "$log"
if [ -s "$run_dir/failures.txt" ]; then echo "failures:"; cat "$run_dir/failures.txt"; fi
exit "$rc"
