#!/usr/bin/env bash
# The main job: set up, execute every chapter on the CPU profile with the embedded default model
# (SmolLM2-135M-Instruct), and build the book. Pages show the committed GPU results where they
# exist and mark clearly any chapter whose numbers come from the CPU profile.
#   bash scripts/book.sh            -> _build/src/_build/html/index.html
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
.venv/bin/python scripts/build_book.py --profile cpu
echo "book: open $(pwd)/_build/src/_build/html/index.html"
