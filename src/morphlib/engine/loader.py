"""Fill the arena: weights from an HF model or random ("dummy") weights made on the device, rotary
tables computed by HF's own rotary class (so Llama-3 rope_theta / rope scaling match), and the INT4
bytes of a layer (quantized by the engine, or taken from a ``Morpher``'s twins: the same bytes, AWQ
scales included)."""

from __future__ import annotations

import torch

from morphlib.engine.memory import FUSED, LINEARS, Arena, Layout
from morphlib.quant.int4 import Int4Linear, pack, unpack


def hf_llama_config(cfg):
    """An HF LlamaConfig from a config object or a ``morphlib.shapes`` dict."""
    from transformers import LlamaConfig

    return LlamaConfig(**cfg) if isinstance(cfg, dict) else cfg


def rope_tables(hf_config, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(config=hf_llama_config(hf_config))
    pos = torch.arange(positions, dtype=torch.int64)[None]
    cos, sin = rot(torch.empty(1, dtype=dtype), pos)
    return cos[0], sin[0]


def _resident(arena: Arena, layout: Layout, name: str) -> torch.Tensor:
    p = layout.resident[name]
    return arena.view(p.offset, p.shape, p.dtype)


def _region(arena: Arena, layout: Layout, layer: int, name: str) -> torch.Tensor:
    p = layout.fp16[name]
    return arena.view(layout.region(layer) + p.offset, p.shape, p.dtype)


def _rows(layout: Layout, name: str) -> tuple[str, int, int]:
    """(16-bit matrix, first row, end row) of projection ``name`` in a layer region."""
    for matrix, members in FUSED.items():
        start = 0
        for m in members:
            n = layout.shapes[m][0]
            if m == name:
                return matrix, start, start + n
            start += n
    raise KeyError(name)


def linear_weight(arena: Arena, layout: Layout, layer: int, name: str) -> torch.Tensor:
    """The 16-bit [N, K] weight of one projection (a row slice of the fused matrices)."""
    matrix, a, b = _rows(layout, name)
    return _region(arena, layout, layer, matrix)[a:b]


def int4_source_weight(arena: Arena, layout: Layout, layer: int, matrix: str) -> torch.Tensor:
    """The 16-bit rows that INT4 matrix ``matrix`` quantizes (``layout.int4_members``): a view, its
    projections' rows back to back as the region holds them."""
    members = layout.int4_members[matrix]
    fp16, a, _ = _rows(layout, members[0])
    _, _, b = _rows(layout, members[-1])
    return _region(arena, layout, layer, fp16)[a:b]


@torch.no_grad()
def fill_rope(arena: Arena, layout: Layout, hf_config) -> None:
    cos, sin = rope_tables(hf_config, layout.resident["cos"].shape[0], layout.dtype)
    _resident(arena, layout, "cos").copy_(cos)
    _resident(arena, layout, "sin").copy_(sin)


@torch.no_grad()
def fill_from_hf(arena: Arena, layout: Layout, model) -> None:
    inner = model.model
    dt = layout.dtype
    _resident(arena, layout, "embed").copy_(inner.embed_tokens.weight.to(dt))
    if not layout.spec.tied:
        _resident(arena, layout, "lm_head").copy_(model.lm_head.weight.to(dt))
    _resident(arena, layout, "final_norm").copy_(inner.norm.weight.to(dt))
    norms = _resident(arena, layout, "norms")
    for li, layer in enumerate(inner.layers):
        norms[li, 0].copy_(layer.input_layernorm.weight.to(dt))
        norms[li, 1].copy_(layer.post_attention_layernorm.weight.to(dt))
        a, m = layer.self_attn, layer.mlp
        src = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
               "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj}
        for name in LINEARS:
            w = getattr(src[name], "weight", None)
            if w is None or w.numel() == 0:
                raise ValueError(f"layer {li} {name} has no 16-bit weight (is the model morphed? restore it first)")
            linear_weight(arena, layout, li, name).copy_(w.to(dt))
    fill_rope(arena, layout, model.config)


@torch.no_grad()
def fill_random(arena: Arena, layout: Layout, hf_config, seed: int = 0) -> None:
    """N(0, 0.02) weights, unit norms (what ``morphlib.models.synthetic_model`` makes), on the arena's device."""
    gen = torch.Generator(device=arena.buf.device).manual_seed(seed)
    for name in layout.resident:
        if name in ("cos", "sin"):
            continue
        t = _resident(arena, layout, name)
        t.fill_(1.0) if "norm" in name else t.normal_(0.0, 0.02, generator=gen)
    for li in range(layout.spec.num_layers):
        for name in layout.fp16:
            _region(arena, layout, li, name).normal_(0.0, 0.02, generator=gen)
    fill_rope(arena, layout, hf_config)


CHUNK_ELEMS = 8 << 20  # weights quantized per piece on the device (float temporaries ~ 4 x 32 MiB)


def quantize_layer(arena: Arena, layout: Layout, layer: int, symmetric: bool) -> dict:
    """The engine's own RTN INT4 twins of one layer's INT4 matrices (``layout.int4``: q/k/v as one
    ``qkv``, gate/up as one ``gate_up``; on the arena's device). RTN is per row and group, so a fused
    matrix holds exactly the rows of its projections quantized apart; for the same reason row-major
    layouts are quantized a few rows at a time, so that the temporaries of a 7B projection stay small
    enough for the engine's construction to keep its budget."""
    out = {}
    for name in layout.int4:
        w = int4_source_weight(arena, layout, layer, name)
        n, k = w.shape
        rows = max(1, CHUNK_ELEMS // k) if layout.int4_layouts[name] in ("triton", "plain") else n
        parts = [Int4Linear.from_weight(w[r:r + rows], group_size=layout.group_size, symmetric=symmetric,
                                        layout=layout.int4_layouts[name], name=f"layer {layer} {name}")
                 for r in range(0, n, rows)]
        out[name] = {"packed": torch.cat([q.packed for q in parts]) if len(parts) > 1 else parts[0].packed,
                     "scale_zero": torch.cat([q.scale_zero for q in parts], dim=1) if len(parts) > 1
                     else parts[0].scale_zero}
    return out


def twins_from_morpher(morpher, layer: int, layout: Layout) -> dict:
    """A Morpher's INT4 twins of one layer as ``layout.int4``'s matrices: the projections of a fused
    matrix stacked row-wise (their 4-bit codes and scale/zero pairs unchanged), re-packed when the
    Morpher's layout differs from this device's."""
    out = {}
    for name, members in layout.int4_members.items():
        twins = [morpher._int4[layer][_morpher_name(morpher._int4[layer], m)] for m in members]
        k = layout.int4_shapes[name][1]
        want = layout.int4_layouts[name]
        if len(twins) == 1 and twins[0].layout == want:
            packed = twins[0].packed
        else:
            q = torch.cat([unpack(t.packed.to(layout.device), t.layout, t.out_features, k) for t in twins])
            packed = pack(q, want)
        d = {"packed": packed, "scale_zero": torch.cat([t.scale_zero for t in twins], dim=1)}
        if layout.awq:  # one projection per matrix (memory.py)
            inv = twins[0].input_scale_inv
            d["input_scale_inv"] = inv if inv is not None else torch.ones(k, dtype=twins[0].scale_zero.dtype)
        out[name] = d
    return out


def _morpher_name(twins: dict, short: str) -> str:
    for full in twins:
        if full.split(".")[-1] == short:
            return full
    raise KeyError(short)
