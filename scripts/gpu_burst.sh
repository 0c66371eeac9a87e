#!/usr/bin/env bash
# Chapter 5's GPU slices on a lent GPU machine: one device command runs one or more named slices (in the
# order given, each only if the time left allows it), then packs the records it wrote into one archive.
#
#   bash scripts/gpu_burst.sh SLICE [SLICE ...] [--deadline S]
#   bash scripts/gpu_burst.sh --next N [--deadline S]       # the next N slices still to run
#   bash scripts/gpu_burst.sh --merge                       # the chapter itself (merge + simulator sweep) on this machine
#
# Slices: `python -m morphbook.replays list` (the calibration slice of a setting first). A replay slice runs
# only its replays not yet on disk and current. Records go to results/burst-replays/ (one gzip'd JSON per
# replay, each with its provenance); $OUT/burst-records.tar.gz holds the files this call wrote (extract it in
# the repository root: `tar xzf burst-records.tar.gz`), $OUT/burst.log the log. --merge packs results/burst
# into $OUT/burst-results.tar.gz. Pass MORPHBOOK_GIT_COMMIT=<sha> (the tree travels without .git).
# SmolLM2 slices use the real weights when an earlier call on this warm machine staged them
# (scripts/gpu_call.sh, calls 1-2); otherwise its shape with random weights, and the records say so.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="/tmp/site:$PWD/src" MORPHLIB_CACHE=/tmp/morphlib-cache
out="${OUT:-/tmp/out}"; mkdir -p "$out"
deadline=540; slices=(); next=0; merge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) deadline="$2"; shift 2 ;;
    --next) next="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    -*) echo "usage: bash scripts/gpu_burst.sh SLICE [SLICE ...] | --next N | --merge [--deadline S]" >&2; exit 2 ;;
    *) slices+=("$1"); shift ;;
  esac
done
source scripts/gpu_provenance.sh  # the commit the results name
start=$(date +%s)
stamp=$(mktemp); touch "$stamp"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/burst.log"
if [ "$merge" = 1 ]; then
  timeout -s INT "$deadline" python3 -m morphbook.run --profile gpu --only burst 2>&1 | tee -a "$out/burst.log"
  rc=${PIPESTATUS[0]}
  tar -czf "$out/burst-results.tar.gz" results/burst && echo "archive: $(du -h "$out/burst-results.tar.gz" | cut -f1)"
  exit "$rc"
fi
if [ "$next" -gt 0 ]; then
  mapfile -t slices < <(python3 -m morphbook.replays todo | head -n "$next")
fi
[ ${#slices[@]} -gt 0 ] || { echo "no slice to run" | tee -a "$out/burst.log"; exit 0; }
rc=0
for s in "${slices[@]}"; do
  left=$(( deadline - ($(date +%s) - start) ))
  if [ "$left" -lt 120 ]; then echo "[$s] not started: ${left} s left" | tee -a "$out/burst.log"; continue; fi
  echo "== $s (${left} s left)" | tee -a "$out/burst.log"
  timeout -s INT "$left" python3 -m morphbook.replays run "$s" --deadline "$(( left - 20 ))" 2>&1 | tee -a "$out/burst.log"
  r=${PIPESTATUS[0]}; [ "$r" = 0 ] || rc=$r
done
find results/burst-replays -type f -newer "$stamp" > /tmp/burst-written.txt 2>/dev/null
if [ -s /tmp/burst-written.txt ]; then
  tar -czf "$out/burst-records.tar.gz" -T /tmp/burst-written.txt && \
    echo "archive: $(wc -l < /tmp/burst-written.txt) file(s), $(du -h "$out/burst-records.tar.gz" | cut -f1)" | tee -a "$out/burst.log"
fi
python3 -m morphbook.replays list 2>&1 | tee -a "$out/burst.log" | head -20
echo "call: $(( $(date +%s) - start )) s" | tee -a "$out/burst.log"
exit "$rc"
