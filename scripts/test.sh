#!/usr/bin/env bash
# Every test, as CI runs it: unit/integration tests on the real default model (pytest), the
# stale-results check, every chapter executed with papermill on the CPU profile, the book built
# from clean with warnings as errors, and every page opened in headless Chromium.
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh --browser --no-vllm
# chapter 6's vLLM environment installs (mostly download and unpacking) while pytest runs
mkdir -p _build
bash scripts/setup_vllm.sh > _build/setup_vllm.log 2>&1 &
vllm_setup=$!
trap 'kill "$vllm_setup" 2>/dev/null || true' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
echo "== pytest (two worker processes of one torch thread each; chapter 6's vLLM environment installs meanwhile)"
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider --durations=15  # the slowest tests, for the CI-time budget
echo "== chapter 6's vLLM environment (scripts/setup_vllm.sh, run beside pytest)"
vllm_rc=0
wait "$vllm_setup" || vllm_rc=$?
cat _build/setup_vllm.log
if [ "$vllm_rc" != 0 ]; then echo "test.sh: scripts/setup_vllm.sh failed (exit $vllm_rc)" >&2; exit 1; fi
echo "== pytest, chapter 6's vLLM environment"
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py
echo "== stale-results check (MODIFIED or missing results fail; STALE is printed, and shown in red on its page)"
.venv/bin/python -m morphbook.publish.stale --results results
echo "== chapters (papermill, cpu profile) and book build (-W)"
.venv/bin/python scripts/build_book.py --profile cpu
echo "== browser check"
.venv/bin/python scripts/browser_check.py
echo "test.sh: all checks passed in $(( $(date +%s) - start )) s"
