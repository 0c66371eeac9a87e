"""A Llama-family forward pass over arena views: embeddings, L decoder layers whose precision is chosen
per layer (16-bit fused GEMMs, or morphlib's INT4 kernels on the bytes at the head of the same region),
paged attention, final norm and LM head on the rows that sample.

Numerics follow Hugging Face's LlamaForCausalLM op by op (the torch path is exact on CPU; the Triton
path rounds like it), except that on the GPU q/k/v and gate/up run as one GEMM each in 16 bit. An INT4
layer runs four INT4 matmuls (qkv, o, gate_up, down; ``Layout.int4``) on every device, seven when AWQ
scales keep the projections apart. A fused matrix holds its projections' INT4 rows unchanged, so its
outputs are theirs: bitwise on CPU, within the INT4 kernels' tolerance on the GPU, whose kernel plan
depends on N (tests/test_engine_fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morphlib.engine import attention as attn
from morphlib.engine import ops
from morphlib.engine.memory import Arena, Layout
from morphlib.quant.int4 import int4_matmul


class Model:
    def __init__(self, layout: Layout, arena: Arena, block_base: torch.Tensor, use_triton: bool):
        self.layout, self.arena, self.spec = layout, arena, layout.spec
        self.dtype = layout.dtype
        self.use_triton = use_triton
        self.block_base = block_base
        self.kv = arena.typed(layout.dtype)
        r = layout.resident
        self.embed = arena.view(r["embed"].offset, r["embed"].shape, r["embed"].dtype)
        self.lm_head = self.embed if layout.spec.tied else arena.view(r["lm_head"].offset, r["lm_head"].shape,
                                                                       r["lm_head"].dtype)
        self.final_norm = arena.view(r["final_norm"].offset, r["final_norm"].shape, self.dtype)
        self.norms = arena.view(r["norms"].offset, r["norms"].shape, self.dtype)
        self.cos = arena.view(r["cos"].offset, r["cos"].shape, self.dtype)
        self.sin = arena.view(r["sin"].offset, r["sin"].shape, self.dtype)
        self.fp16, self.int4 = [], []
        for layer in range(self.spec.num_layers):
            base = layout.region(layer)
            self.fp16.append({k: arena.view(base + p.offset, p.shape, p.dtype) for k, p in layout.fp16.items()})
            self.int4.append({name: {f: arena.view(base + p.offset, p.shape, p.dtype) for f, p in pieces.items()}
                              for name, pieces in layout.int4.items()})
        self.int4_layers: frozenset[int] = frozenset()  # layers that run INT4 (set by the engine per step)
        self.scale = attn.default_scale(self.spec.head_dim)
        self.decode_splits = 1
        # one GEMM for q/k/v and one for gate/up on the GPU; on CPU separate GEMMs over the same bytes,
        # because a single-row GEMM's rounding there depends on N (and HF runs them separately)
        self.fuse = use_triton

    @property
    def state(self) -> frozenset:
        return frozenset(self.int4_layers)

    # ------------------------------------------------------------------ pieces
    def _int4(self, x: torch.Tensor, layer: int, matrix: str) -> torch.Tensor:
        """16-bit matrix ``matrix``'s output (``qkv``, ``o``, ``gate_up``, ``down``) from the layer's INT4
        head: one launch per INT4 matrix that holds its rows (one; one per projection with AWQ scales)."""
        ys = [self._int4_matmul(x, layer, name) for name in self.layout.int4_of[matrix]]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def _int4_matmul(self, x: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        p = self.int4[layer][name]
        n, k = self.layout.int4_shapes[name]
        y = int4_matmul(x.to(torch.bfloat16), p["packed"], p["scale_zero"], n=n, k=k,
                        group_size=self.layout.group_size, layout=self.layout.int4_layouts[name],
                        input_scale_inv=p.get("input_scale_inv"), mode="fast")  # the fastest kernel per row count
        return y.to(x.dtype)

    def _norm(self, x, residual, w):
        if self.use_triton:
            return ops.add_rmsnorm_triton(x, residual, w, self.spec.eps)
        return ops.add_rmsnorm_ref(x, residual, w, self.spec.eps)

    def _attention(self, q, layer: int, meta: attn.AttnMeta):
        k_off, v_off = self.layout.layer_kv_offsets(layer)
        args = (q, self.kv, k_off, v_off, meta, self.block_base, self.layout.block_size, self.spec.num_kv_heads,
                self.scale)
        if not self.use_triton:
            return attn.attention_ref(*args)
        if meta.decode:
            return attn.attention_decode(*args, splits=self.decode_splits)
        return attn.attention_varlen(*args)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: attn.AttnMeta,
                sample_rows: torch.Tensor | None, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """ids/positions [T]; returns logits [rows, V] (model dtype) for ``sample_rows`` (None: all rows)."""
        spec = self.spec
        qd, kvd, inter = spec.q_dim, spec.kv_dim, spec.intermediate
        h = F.embedding(ids, self.embed)
        res = None
        if self.use_triton:
            slot = meta.slot_off
        else:
            slot = meta.cache.get("slot")
            if slot is None:
                valid = meta.slot_off >= 0
                rows = None if bool(valid.all()) else valid.nonzero().flatten()
                so = meta.slot_off if rows is None else meta.slot_off[rows]
                slot = meta.cache["slot"] = (so[:, None] + torch.arange(kvd, device=so.device)[None, :], rows)
        for layer in range(spec.num_layers):
            x, res = self._norm(h, res, self.norms[layer, 0])
            int4 = layer in self.int4_layers
            w = self.fp16[layer]
            if int4:
                q, k, v = self._int4(x, layer, "qkv").split([qd, kvd, kvd], dim=-1)
            elif self.fuse:
                q, k, v = F.linear(x, w["qkv"]).split([qd, kvd, kvd], dim=-1)
            else:
                q, k, v = (F.linear(x, w["qkv"][a:b]) for a, b in ((0, qd), (qd, qd + kvd), (qd + kvd, qd + 2 * kvd)))
            k_off, v_off = self.layout.layer_kv_offsets(layer)
            if self.use_triton:
                q = ops.rope_store_triton(q, k, v, positions, self.cos, self.sin, self.kv, slot, k_off, v_off,
                                          spec.num_heads, spec.num_kv_heads)
            else:
                q = ops.rope_store_ref(q, k, v, positions, self.cos, self.sin, self.kv, slot, k_off, v_off,
                                       spec.num_heads, spec.num_kv_heads)
            o = self._attention(q, layer, meta)
            h = self._int4(o, layer, "o") if int4 else F.linear(o, self.fp16[layer]["o"])
            x, res = self._norm(h, res, self.norms[layer, 1])
            if int4:
                g, u = self._int4(x, layer, "gate_up").split([inter, inter], dim=-1)
            elif self.fuse:
                g, u = F.linear(x, w["gate_up"]).split([inter, inter], dim=-1)
            else:
                g, u = F.linear(x, w["gate_up"][:inter]), F.linear(x, w["gate_up"][inter:])
            a = ops.silu_mul_triton(g, u) if self.use_triton else ops.silu_mul_ref(g, u)
            h = self._int4(a, layer, "down") if int4 else F.linear(a, self.fp16[layer]["down"])
        if sample_rows is not None:
            h, res = h[sample_rows], res[sample_rows]
        x, _ = self._norm(h, res, self.final_norm)
        if logits_out is not None:
            return torch.mm(x, self.lm_head.t(), out=logits_out)
        return F.linear(x, self.lm_head)

    # ------------------------------------------------------------------ INT4 byte placement
    def int4_views(self, layer: int) -> dict:
        return self.int4[layer]


def int4_head_blob(layout: Layout, twins: dict) -> torch.Tensor:
    """The bytes of one layer's INT4 head (CPU uint8 [head_bytes]) from its twins' buffers
    {INT4 matrix: {"packed", "scale_zero", "input_scale_inv"?}} (``loader.quantize_layer``,
    ``loader.twins_from_morpher``), placed as ``layout.int4`` says."""
    blob = torch.zeros(layout.head_bytes, dtype=torch.uint8)
    for name, pieces in layout.int4.items():
        for field, piece in pieces.items():
            t = twins[name][field].detach().to("cpu").contiguous()
            if tuple(t.shape) != piece.shape or t.dtype != piece.dtype:
                raise AssertionError(f"{name}.{field}: {tuple(t.shape)} {t.dtype}, layout wants {piece.shape} {piece.dtype}")
            b = t.view(torch.uint8).flatten()
            blob[piece.offset:piece.offset + b.numel()] = b
    return blob
