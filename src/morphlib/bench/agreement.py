"""Top-1 agreement and KL against an fp32 reference on shared forced continuations: the engine
benchmark's correctness measure (it replaces "99.5 % top-1 agreement with HF bf16", which HF's own
bf16 decode cannot meet).

* One continuation per prompt, fixed once (fp32 HF's own greedy tokens), is fed to every candidate;
  each candidate gives its next-token logits at every position of it. The **reference** is fp32 HF
  teacher-forced on prompt + continuation.
* A position is **decisive** when the reference's top-2 logit gap exceeds ``DECISIVE_ULPS`` bf16 ulps
  of its top logit (a tolerance fixed before measuring): there, any correct bf16 implementation must
  pick the reference's token. The share of positions left out is reported.
* Per candidate: top-1 agreement with the reference on decisive positions and on all positions, and
  the mean KL(reference || candidate) in fp32; their ratio counts a KL below ``KL_FLOOR`` (fp32 rounding,
  e.g. an fp32 engine against the fp32 reference) as the floor.

``Reference`` holds the reference (log-probabilities on its device, filled batch by batch);
``Scores`` collects one candidate's top-1 and KL per position as its logits arrive, in any order
(the engine's steps mix prompts and positions); ``compare(engine, hf)`` gives the benchmark's figures.
"""

from __future__ import annotations

import torch

from morphlib.errors import MorphError

DECISIVE_ULPS = 4  # fixed before measuring: 4 bf16 ulps of the reference's top logit
KL_FLOOR = 1e-6  # nats: KLs below it are fp32 rounding (two fp32 evaluations of one model), counted as it in the ratio


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2.0 ** -126))) - 7)


class Reference:
    """The fp32 reference on ``n`` prompts x ``T`` forced tokens: log-probabilities [n, T, V] (on
    ``device``), top-1, top-2 gap and the decisive mask."""

    def __init__(self, continuation: torch.Tensor, vocab: int, device):
        if continuation.dim() != 2 or continuation.numel() == 0:
            raise MorphError(f"continuation must be token ids [n, T] with n, T >= 1, got {tuple(continuation.shape)}")
        self.continuation = continuation.to(torch.int64).cpu()
        n, t = continuation.shape
        self.device = torch.device(device)
        self.logp = torch.empty((n, t, vocab), dtype=torch.float32, device=self.device)
        self.top1 = torch.full((n, t), -1, dtype=torch.int64, device=self.device)
        self.gap = torch.empty((n, t), dtype=torch.float32, device=self.device)
        self.tolerance = torch.empty((n, t), dtype=torch.float32, device=self.device)
        self._filled = torch.zeros(n, dtype=torch.bool)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.continuation.shape)

    def fill(self, start: int, logits: torch.Tensor) -> None:
        """Rows ``start..start+b`` from fp32 logits [b, T, V] at the continuation's positions."""
        if logits.dtype != torch.float32:
            raise MorphError(f"the reference's logits must be float32, got {logits.dtype}")
        b = logits.shape[0]
        if logits.shape[1:] != self.logp.shape[1:] or not 0 <= start <= self.logp.shape[0] - b:
            raise MorphError(f"reference rows {start}..{start + b} of shape {tuple(logits.shape)} do not fit "
                             f"{tuple(self.logp.shape)}")
        logits = logits.to(self.device)
        top2 = logits.topk(2, dim=-1).values
        self.logp[start:start + b] = torch.log_softmax(logits, dim=-1)
        self.top1[start:start + b] = logits.argmax(-1)
        self.gap[start:start + b] = top2[..., 0] - top2[..., 1]
        self.tolerance[start:start + b] = DECISIVE_ULPS * bf16_ulp(top2[..., 0])
        self._filled[start:start + b] = True

    @property
    def decisive(self) -> torch.Tensor:
        return self.gap > self.tolerance

    def check_complete(self) -> None:
        if not bool(self._filled.all()):
            raise MorphError(f"the reference has rows that were never filled: {(~self._filled).nonzero().flatten().tolist()[:8]}")


class Scores:
    """One candidate's top-1 and KL(reference || candidate) per position, filled as its logits arrive."""

    def __init__(self, reference: Reference, name: str):
        reference.check_complete()
        self.ref, self.name = reference, name
        n, t = reference.shape
        self.top1 = torch.full((n, t), -1, dtype=torch.int64, device=reference.device)
        self.kl = torch.full((n, t), float("nan"), dtype=torch.float32, device=reference.device)

    def add(self, rows, cols, logits: torch.Tensor) -> None:
        """Logits [b, V] of prompts ``rows`` at continuation positions ``cols`` (sequences of b ints or
        tensors). The candidate's top-1 is the argmax of its own logits (what its greedy sampler picks)."""
        dev = self.ref.device
        rows = torch.as_tensor(rows, dtype=torch.int64, device=dev)
        cols = torch.as_tensor(cols, dtype=torch.int64, device=dev)
        logits = logits.to(dev)
        if logits.dim() != 2 or logits.shape[0] != rows.numel() or rows.numel() != cols.numel():
            raise MorphError(f"{self.name}: {rows.numel()} rows, {cols.numel()} positions and logits of shape "
                             f"{tuple(logits.shape)} do not match")
        ref = self.ref.logp[rows, cols]
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.top1[rows, cols] = logits.argmax(-1)
        self.kl[rows, cols] = (ref.exp() * (ref - logp)).sum(-1)

    def summary(self) -> dict:
        missing = int((self.top1 < 0).sum())
        if missing:
            raise MorphError(f"{self.name}: {missing} of {self.top1.numel()} positions were never scored")
        ref = self.ref
        hit = self.top1 == ref.top1
        decisive = ref.decisive
        gap_ulps = ref.gap / (ref.tolerance / DECISIVE_ULPS)  # the reference's top-2 gap in bf16 ulps
        misses = (decisive & ~hit).nonzero()[:20].tolist()
        return {"positions": int(hit.numel()), "agreement": int(hit.sum()) / int(hit.numel()),
                "decisive_positions": int(decisive.sum()),
                # a ratio of counts: a float32 mean of 14,328 ones reads 0.99999994 on CUDA (sum times 1/N)
                "decisive_agreement": int(hit[decisive].sum()) / int(decisive.sum()) if bool(decisive.any()) else float("nan"),
                "decisive_disagreements": [(r, c, round(float(gap_ulps[r, c]), 2)) for r, c in misses],
                "disagreements": int((~hit).sum()),
                "disagreement_gap_ulps_max": round(float(gap_ulps[~hit].max()), 2) if not bool(hit.all()) else None,
                "kl_mean": float(self.kl.double().mean()), "kl_max": float(self.kl.max())}


def compare(engine: Scores, hf: Scores) -> dict:
    """The benchmark's figures: the engine against the reference, beside HF's own incremental decode."""
    if engine.ref is not hf.ref:
        raise MorphError("the engine and HF were scored against different references")
    e, h = engine.summary(), hf.summary()
    excluded = 1.0 - e["decisive_positions"] / e["positions"]
    ratio = max(e["kl_mean"], KL_FLOOR) / max(h["kl_mean"], KL_FLOOR)
    return {"positions": e["positions"], "decisive_tolerance_bf16_ulps": DECISIVE_ULPS,
            "decisive_excluded_share": excluded,
            "top1_decisive_agreement": e["decisive_agreement"],
            "top1_agreement_engine": e["agreement"], "top1_agreement_hf_incremental": h["agreement"],
            "top1_gap_vs_hf_incremental_pts": 100.0 * (h["agreement"] - e["agreement"]),
            "kl_engine": e["kl_mean"], "kl_hf_incremental": h["kl_mean"], "kl_ratio_vs_hf": ratio,
            "engine": e, "hf_incremental": h}
