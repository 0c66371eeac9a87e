"""KV block bookkeeping over groups of block ids whose capacity grows and shrinks with the morph state.

Block ids are fixed at engine start (``memory.Layout``): group ``"main"`` is the main pool, group ``l``
(an int) holds the whole blocks that fit in the freed tail of layer l's 16-bit region once l runs
INT4. A swap *adds* group l, a restore *removes* it, which is refused while any of its blocks is
live; ``drain(l)`` first stops new allocations from it, and ``migrate(l)`` moves the owners of its
live blocks to free blocks elsewhere (the caller copies the bytes and rewrites the block tables).
Allocation takes blocks from the main pool first, then from tail groups in the order they were added,
so the newest tail (restored first, LIFO) is the last to fill. Every block has one owner (a sequence id) or none; ``check()`` verifies it.
"""

from __future__ import annotations

from collections import deque

from morphlib.errors import MorphError

FREE = -1


class BlockManager:
    def __init__(self, block_size: int, num_ids: int):
        self.block_size = block_size
        self.owner = [FREE] * num_ids  # sequence id holding each block, or FREE
        self.group_of: list = [None] * num_ids  # enabled group of each id (None: not enabled)
        self.groups: dict = {}  # key -> tuple of ids
        self.free: dict = {}  # key -> deque of free ids
        self.order: list = []  # allocation order of enabled groups
        self.draining: set = set()

    # ------------------------------------------------------------------ capacity
    def add_group(self, key, ids) -> None:
        ids = tuple(ids)
        if key in self.groups:
            raise MorphError(f"KV block group {key!r} is already enabled")
        for i in ids:
            if self.group_of[i] is not None or self.owner[i] != FREE:
                raise MorphError(f"KV block {i} is already in use (group {self.group_of[i]!r})")
        for i in ids:
            self.group_of[i] = key
        self.groups[key] = ids
        self.free[key] = deque(ids)
        self.order.append(key)

    def drain(self, key) -> list[int]:
        """Stop handing out blocks of group ``key``; returns its live block ids."""
        self._known(key)
        self.draining.add(key)
        return self.live_blocks(key)

    def undrain(self, key) -> None:
        self.draining.discard(key)

    def live_blocks(self, key) -> list[int]:
        self._known(key)
        return [i for i in self.groups[key] if self.owner[i] != FREE]

    def holders(self, key) -> set[int]:
        return {self.owner[i] for i in self.live_blocks(key)}

    def migrate(self, key) -> list[tuple[int, int]]:
        """Give every live block of group ``key`` a free block of another enabled, non-draining group (the
        main pool first) and move its owner there; returns the (old, new) id pairs, or [] (nothing moved)
        when too few blocks are free. The old blocks become free (and stay out of use while ``key`` drains);
        the caller copies their bytes and rewrites the owners' block tables."""
        live = self.live_blocks(key)
        if not live or len(live) > sum(len(self.free[k]) for k in self.order if k != key and k not in self.draining):
            return []
        pairs = []
        targets = (k for k in self.order if k != key and k not in self.draining)
        q = self.free[next(targets)]
        for src in live:
            while not q:
                q = self.free[next(targets)]
            dst = q.popleft()
            assert self.owner[dst] == FREE, f"block {dst} handed out twice"
            self.owner[dst], self.owner[src] = self.owner[src], FREE
            self.free[key].append(src)
            pairs.append((src, dst))
        return pairs

    def remove_group(self, key) -> None:
        """Take group ``key``'s blocks out of the pool; refused while one of them is live."""
        self._known(key)
        live = self.live_blocks(key)
        if live:
            raise MorphError(f"cannot shrink the KV pool: {len(live)} block(s) of group {key!r} are live")
        for i in self.groups[key]:
            self.group_of[i] = None
        del self.groups[key], self.free[key]
        self.order.remove(key)
        self.draining.discard(key)

    def reset(self) -> None:
        """Every block free again, the free lists back in id order (after every tail group was removed)."""
        if self.order != ["main"]:
            raise MorphError(f"cannot reset the KV pool while tail groups {self.order[1:]} are enabled")
        self.owner = [FREE] * len(self.owner)
        self.free["main"] = deque(self.groups["main"])
        self.draining.clear()

    def _known(self, key) -> None:
        if key not in self.groups:
            raise MorphError(f"KV block group {key!r} is not enabled")

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (enabled groups that are not draining)."""
        return sum(len(self.groups[k]) for k in self.order if k not in self.draining)

    @property
    def num_free(self) -> int:
        return sum(len(self.free[k]) for k in self.order if k not in self.draining)

    @property
    def num_used(self) -> int:
        return sum(len(self.groups[k]) - len(self.free[k]) for k in self.order)

    # ------------------------------------------------------------------ sequences
    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def grow(self, seq_id: int, table: list[int], num_tokens: int) -> None:
        """Extend ``table`` (in place) to cover ``num_tokens`` tokens."""
        n = self.blocks_needed(table, num_tokens)
        if n > self.num_free:
            raise MorphError(f"out of KV blocks: need {n}, {self.num_free} free")
        for key in self.order:
            if n == 0:
                break
            if key in self.draining:
                continue
            q = self.free[key]
            while q and n:
                i = q.popleft()
                assert self.owner[i] == FREE, f"block {i} handed out twice"
                self.owner[i] = seq_id
                table.append(i)
                n -= 1

    def release(self, seq_id: int, table: list[int]) -> None:
        """Free every block of ``table`` (and clear it)."""
        for i in reversed(table):
            if self.owner[i] != seq_id:
                raise AssertionError(f"block {i} is owned by {self.owner[i]}, not by sequence {seq_id}")
            self.owner[i] = FREE
            self.free[self.group_of[i]].appendleft(i)
        table.clear()

    def shrink(self, seq_id: int, table: list[int], num_tokens: int) -> None:
        """Free the blocks of ``table`` past the first ``num_tokens`` tokens."""
        keep = -(-num_tokens // self.block_size)
        tail = table[keep:]
        del table[keep:]
        self.release(seq_id, tail)

    # ------------------------------------------------------------------ invariants
    def check(self, tables: dict[int, list[int]] | None = None) -> None:
        """Every enabled block is free xor owned; free lists hold no duplicates; optional owner tables agree."""
        seen = set()
        for key in self.order:
            for i in self.free[key]:
                assert i not in seen, f"block {i} twice in the free lists"
                assert self.owner[i] == FREE and self.group_of[i] == key
                seen.add(i)
            for i in self.groups[key]:
                assert (i in seen) != (self.owner[i] != FREE), f"block {i} is neither free nor owned (or both)"
        for i, o in enumerate(self.owner):
            if o != FREE:
                assert self.group_of[i] is not None, f"live block {i} is not in an enabled group"
        if tables is not None:
            owned = {}
            for sid, table in tables.items():
                for i in table:
                    assert i not in owned, f"block {i} in the tables of {owned[i]} and {sid}"
                    owned[i] = sid
                    assert self.owner[i] == sid
            assert sum(o != FREE for o in self.owner) == len(owned), "a live block belongs to no table (leak)"
