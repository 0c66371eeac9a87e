"""One byte arena per engine: every weight, every KV block and the swap staging are views into it.

Layout (byte offsets, every piece aligned to ``ALIGN``)::

    | resident: embed, lm_head (untied), norms, rope cos/sin | layer 0 region | ... | layer L-1 region |
    | staging slot 0 | staging slot 1 | KV main pool: block 0, block 1, ... |

A layer region holds the layer's 16-bit projections as four matrices, ``qkv`` [q+k+v rows, H],
``o``, ``gate_up`` [2I rows, H] and ``down`` (``FUSED``): q/k/v and gate/up sit back to back, so one
GEMM runs each fused pair. A swapped layer's INT4 bytes occupy the region's *head*, ``head_bytes``
long: the same four matrices quantized as four INT4 matrices (``packed`` and ``scale_zero`` in the
layout ``morphlib.quant.int4.packed_specs`` gives for this device; RTN is per row and group, so the
fused matrix's rows are the separate projections' rows), one INT4 launch each. With AWQ input scales
(one per projection, ``morphlib.awq``: q/k/v do not share theirs) each projection stays its own INT4
matrix with its ``input_scale_inv`` (``int4_members`` / ``int4_of`` say which). The *tail* after
``align(head_bytes)`` holds ``tail_blocks`` whole KV blocks. The head/tail split is the same for every
layer (same shapes), so it is plain arithmetic.

A KV block is full depth: [layer][k|v][token][kv head][head dim] in the model dtype. Block ids are
fixed at start: ``0 .. main_blocks-1`` in the main pool, then each layer's tail blocks. The attention
kernels read a block through ``block_base[id]``, its element offset in the arena (as that dtype).

The oracle ablation (``EngineConfig.swap_compute="fp16"``: a swapped layer keeps its 16-bit compute)
appends one *shadow region* per swappable layer after the KV pool, outside the budget: the swap's
copies land there instead of in the live region, and the layer's tail blocks live in the shadow's tail.
``home(layer)`` is where a layer's morph bytes go (its region, or its shadow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphlib.engine.spec import ModelSpec
from morphlib.errors import MorphError
from morphlib.quant.int4 import choose_layout, packed_specs

ALIGN = 256
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the 16-bit matrices of a layer region and the projections whose rows each holds, in row order
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def stacked_shape(shapes: dict, members) -> tuple[int, int]:
    """(N, K) of the projections ``members`` stacked row-wise (they share K)."""
    return sum(shapes[m][0] for m in members), shapes[members[0]][1]


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class Piece:
    offset: int  # bytes, relative to the arena (resident) or to the region start (layer pieces)
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


class Layout:
    """Byte offsets of everything in the arena, for one model spec, dtype, device and block size."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, block_size: int,
                 group_size: int, awq: bool, staging_slots: int, max_positions: int):
        self.spec, self.dtype, self.device, self.block_size = spec, dtype, device, block_size
        self.group_size, self.awq = group_size, awq
        h, v = spec.hidden, spec.vocab
        off = 0
        self.resident: dict[str, Piece] = {}

        def put(name, shape, dt):
            nonlocal off
            self.resident[name] = Piece(off, tuple(shape), dt)
            off = align(off + _nbytes(shape, dt))

        put("embed", (v, h), dtype)
        if not spec.tied:
            put("lm_head", (v, h), dtype)
        put("final_norm", (h,), dtype)
        put("norms", (spec.num_layers, 2, h), dtype)
        put("cos", (max_positions, spec.head_dim), dtype)
        put("sin", (max_positions, spec.head_dim), dtype)
        self.resident_bytes = off

        # ---- a layer region: 16-bit matrices
        shapes = spec.linear_shapes()
        self.shapes = shapes
        self.fp16: dict[str, Piece] = {}
        r = 0
        for name, members in FUSED.items():
            rows, k = stacked_shape(shapes, members)
            self.fp16[name] = Piece(r, (rows, k), dtype)
            r += rows * k * _nbytes((1,), dtype)
        self.region_bytes = align(r)

        # ---- the INT4 head of a region (layout chosen for this device, never hard-coded): its matrices,
        # the projections each holds (int4_members) and those that compute each 16-bit matrix (int4_of)
        self.int4_members = {name: (name,) for name in LINEARS} if awq else dict(FUSED)
        self.int4_of = dict(FUSED) if awq else {name: (name,) for name in FUSED}
        self.int4_shapes = {name: stacked_shape(shapes, members) for name, members in self.int4_members.items()}
        self.int4: dict[str, dict[str, Piece]] = {}
        self.int4_layouts: dict[str, str] = {}
        hoff = 0
        for name, (n, k) in self.int4_shapes.items():
            layout = choose_layout(n, k, device)
            self.int4_layouts[name] = layout
            specs = packed_specs(n, k, group_size, layout)
            pieces = {}
            for field in ("packed", "scale_zero"):
                shape, dt = specs[field]
                pieces[field] = Piece(hoff, tuple(shape), dt)
                hoff = align(hoff + _nbytes(shape, dt))
            if awq:
                pieces["input_scale_inv"] = Piece(hoff, (k,), specs["scale_zero"][1])
                hoff = align(hoff + _nbytes((k,), specs["scale_zero"][1]))
            self.int4[name] = pieces
        self.head_bytes = hoff  # aligned
        kvh, hd = spec.num_kv_heads, spec.head_dim
        self.elem = _nbytes((1,), dtype)
        self.block_bytes = align(2 * spec.num_layers * block_size * kvh * hd * self.elem)
        self.tail_offset = align(self.head_bytes)
        self.tail_blocks = max(0, (self.region_bytes - self.tail_offset) // self.block_bytes)
        self.staging_slots = staging_slots
        self.slot_bytes = align(self.head_bytes)

        self.region0 = self.resident_bytes
        self.staging0 = self.region0 + spec.num_layers * self.region_bytes
        self.pool0 = self.staging0 + staging_slots * self.slot_bytes
        self.main_blocks = 0
        self.shadow: dict[int, int] = {}  # layer -> index of its shadow region (oracle ablation)

    # ------------------------------------------------------------------ sizes
    @property
    def weight_bytes(self) -> int:
        return self.resident_bytes + self.spec.num_layers * self.region_bytes

    @property
    def fixed_bytes(self) -> int:
        """Everything in the arena but the main KV pool."""
        return self.pool0

    @property
    def shadow0(self) -> int:
        return self.pool0 + self.main_blocks * self.block_bytes

    @property
    def shadow_bytes(self) -> int:
        """The oracle reserve: shadow regions outside the budget (0 unless ``swap_compute="fp16"``)."""
        return len(self.shadow) * self.region_bytes

    def arena_bytes(self) -> int:
        return self.shadow0 + self.shadow_bytes

    def set_main_blocks(self, n: int) -> None:
        self.main_blocks = n

    def set_shadow(self, layers) -> None:
        self.shadow = {li: i for i, li in enumerate(sorted(layers))}

    def region(self, layer: int) -> int:
        return self.region0 + layer * self.region_bytes

    def home(self, layer: int) -> int:
        """Where layer ``layer``'s INT4 head and KV tail live: its region, or its shadow region (oracle)."""
        i = self.shadow.get(layer)
        return self.region(layer) if i is None else self.shadow0 + i * self.region_bytes

    def slot(self, i: int) -> int:
        return self.staging0 + i * self.slot_bytes

    # ------------------------------------------------------------------ block ids
    @property
    def num_block_ids(self) -> int:
        return self.main_blocks + self.spec.num_layers * self.tail_blocks

    def main_ids(self) -> range:
        return range(self.main_blocks)

    def tail_ids(self, layer: int) -> range:
        first = self.main_blocks + layer * self.tail_blocks
        return range(first, first + self.tail_blocks)

    def block_offset(self, block_id: int) -> int:
        """Byte offset of a block in the arena."""
        if block_id < self.main_blocks:
            return self.pool0 + block_id * self.block_bytes
        layer, j = divmod(block_id - self.main_blocks, self.tail_blocks)
        return self.home(layer) + self.tail_offset + j * self.block_bytes

    def block_base(self) -> torch.Tensor:
        """int64 [num_block_ids]: each block's offset in elements of the model dtype."""
        return torch.tensor([self.block_offset(i) // self.elem for i in range(self.num_block_ids)], dtype=torch.int64)

    def layer_kv_offsets(self, layer: int) -> tuple[int, int]:
        """Element offsets of layer ``layer``'s K and V inside a block."""
        stride = self.block_size * self.spec.kv_dim
        return (2 * layer) * stride, (2 * layer + 1) * stride


PER_BLOCK_ID_BYTES = 8 * 2  # a block_base entry on the device + the host list


def main_pool_blocks(layout: Layout, budget: int, workspace: int, kv_blocks: int | None, max_model_len: int,
                     name: str) -> int:
    """Blocks of the main KV pool: what ``budget`` leaves after the arena's fixed part (weights, staging),
    the workspace and the block tables, capped at ``kv_blocks``; a one-line error when one
    ``max_model_len``-token sequence would not fit."""
    min_blocks = -(-max_model_len // layout.block_size)
    tails = layout.spec.num_layers * layout.tail_blocks
    avail = budget - layout.fixed_bytes - workspace - PER_BLOCK_ID_BYTES * tails
    main = max(0, avail // (layout.block_bytes + PER_BLOCK_ID_BYTES))
    if kv_blocks is not None:
        main = min(main, kv_blocks)
    if main >= min_blocks:
        return main
    if kv_blocks is not None and kv_blocks < min_blocks:
        raise MorphError(f"kv_blocks={kv_blocks} cannot hold one {max_model_len}-token sequence ({min_blocks} blocks)")
    need = layout.fixed_bytes + workspace + min_blocks * (layout.block_bytes + PER_BLOCK_ID_BYTES)
    raise MorphError(
        f"memory budget {_size(budget)} is too small for {name}: it needs at least {_size(need)} "
        f"(weights {_size(layout.weight_bytes)}, swap staging {_size(layout.staging_slots * layout.slot_bytes)}, "
        f"workspace {_size(workspace)}, KV for one {max_model_len}-token sequence "
        f"{_size(min_blocks * layout.block_bytes)})")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Arena:
    """The engine's one allocation (uint8) and typed views into it."""

    def __init__(self, nbytes: int, device: torch.device):
        self.nbytes = align(nbytes)
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        n = _nbytes(shape, dtype)
        return self.buf[offset:offset + n].view(dtype).view(*shape)

    def bytes(self, offset: int, n: int) -> torch.Tensor:
        return self.buf[offset:offset + n]

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole arena as a flat tensor of ``dtype`` (the KV cache's view)."""
        return self.buf.view(dtype)
