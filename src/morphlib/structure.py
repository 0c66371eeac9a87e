"""What a loaded causal LM is made of, for any family: its decoder layers, their linears and its output head.

``decoder_layers(model)`` (the decoder's layer list, through ``get_decoder()``), ``layer_linears(layer)``
(every ``nn.Linear`` of a layer, whatever its names or fusion: q/k/v/o + gate/up/down for Llama, Gemma,
Qwen2, Mistral; qkv/gate_up fused for Phi-3) and ``lm_head_logits(model, hidden)`` (the output head with
the family's final logit soft-capping). ``check_family(model)`` refuses, in one line naming the family, a
model whose decoder layers the library cannot morph (no decoder layer list, weights outside ``nn.Linear``
such as GPT-2's ``Conv1D`` or fused MoE experts). ``check_layers`` validates layer indices.

Below ``eval`` and ``models`` in the package order: it reads a model, never loads or scores one.
"""

from __future__ import annotations

import torch
from torch import nn

from morphlib.errors import MorphError, check_int
from morphlib.quant.int4 import Int4Linear


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
    """Validate layer indices (integers in range, numpy integers too, no duplicates); returns them sorted."""
    n = num_layers(model)
    out = [check_int(f"layer index (the model has {n} layers)", idx, lo=0, hi=n - 1) for idx in layers]
    if len(set(out)) != len(out):
        raise MorphError(f"duplicate layer indices in {sorted(out)}")
    return sorted(out)


def check_layer_indices(n: int, layers) -> list[int]:
    """``check_layers`` for a model known only by its layer count ``n`` (e.g. from its config, before loading)."""
    out = [check_int(f"layer index (the model has {n} layers)", idx, lo=0, hi=n - 1) for idx in layers]
    if len(set(out)) != len(out):
        raise MorphError(f"duplicate layer indices in {sorted(out)}")
    return sorted(out)


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Linear projections of one decoder layer, by dotted name (q/k/v/o_proj, gate/up/down_proj...)."""
    found = {name: mod for name, mod in layer.named_modules() if isinstance(mod, (nn.Linear, Int4Linear))}
    if not found:
        raise MorphError(f"no linear layers found in {type(layer).__name__}")
    return found
