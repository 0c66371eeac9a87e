"""Quality metrics shared by the chapters, all per window so that statistics can pair them.

* perplexity: exp of the mean next-token negative log-likelihood (NLL) over every predicted token;
* KL divergence KL(P_16bit || P_morphed) of next-token distributions, mean over tokens;
* top-1 agreement: fraction of positions where both models' most likely next token is the same;
* greedy token match: fraction of positions where greedy generations agree, and the length of the
  common prefix (generation diverges for good after the first mismatch).

The 16-bit reference log-probabilities are computed once (``Reference``) and kept on the model's
device in bf16, so scoring a morphed model needs one forward pass per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from morphlib.errors import MorphError, check_int
from morphlib.structure import lm_head_logits, one_pass_exact, text_config

REFERENCE_BUDGET_BYTES = {"cpu": 4 << 30, "cuda": 24 << 30}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _batches(model: nn.Module, ids: torch.Tensor, batch_size: int, with_hidden: bool = False):
    """Per batch: (start, targets, next-token log-probs[, final hidden state after the last norm])."""
    if ids.numel() == 0 or ids.shape[-1] < 2:
        raise MorphError("nothing to score: need at least one window of at least 2 tokens")
    batch_size = check_int("batch size", batch_size)
    dev = _device(model)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(dev)
        if with_hidden and one_pass_exact(model):
            # one pass gives both: the head (and the family's logit soft-capping) applied to the final hidden
            # state, as forward() does -- checked bitwise against forward() once per model
            hidden = model.get_decoder()(batch, use_cache=False).last_hidden_state
            logits = lm_head_logits(model, hidden)[:, :-1].float()
            yield start, batch[:, 1:], torch.log_softmax(logits, dim=-1), hidden
        elif with_hidden:  # a family whose forward() does more after the head: two passes
            hidden = model.get_decoder()(batch, use_cache=False).last_hidden_state
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            yield start, batch[:, 1:], torch.log_softmax(logits, dim=-1), hidden
        else:
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            yield start, batch[:, 1:], torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Mean next-token NLL of each window [n]."""
    out = []
    for _, target, logp in _batches(model, ids, batch_size):
        out.append(-logp.gather(-1, target[..., None])[..., 0].mean(dim=1).cpu())
    return torch.cat(out).double().numpy()


@dataclass
class Reference:
    """The 16-bit model's outputs on a fixed set of windows."""

    ids: torch.Tensor
    logp: torch.Tensor  # bf16 [n, T-1, V] on the model's device
    nll: np.ndarray  # [n]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> "Reference":
        dev = _device(model)
        vocab = getattr(text_config(model), "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
        need = ids.shape[0] * (ids.shape[1] - 1) * vocab * 2
        budget = REFERENCE_BUDGET_BYTES.get(dev.type, 4 << 30)
        if need > budget:
            raise MorphError(f"reference log-probs would need {need / 2**30:.1f} GiB (> {budget / 2**30:.0f} GiB): "
                             "use fewer or shorter windows")
        chunks, nll = [], []
        for _, target, logp in _batches(model, ids, batch_size):
            chunks.append(logp.to(torch.bfloat16))
            nll.append(-logp.gather(-1, target[..., None])[..., 0].mean(dim=1).cpu())
        return cls(ids, torch.cat(chunks), torch.cat(nll).double().numpy())

    @property
    def ppl(self) -> float:
        return float(math.exp(self.nll.mean()))


@dataclass
class Scores:
    nll: np.ndarray  # [n] mean NLL per window
    kl: np.ndarray  # [n] mean KL(ref || model) per window
    top1: np.ndarray  # [n] top-1 agreement per window

    @property
    def ppl(self) -> float:
        return float(math.exp(self.nll.mean()))

    def summary(self) -> dict:
        return {"ppl": self.ppl, "kl": float(self.kl.mean()), "top1": float(self.top1.mean())}


@torch.no_grad()
def score(model: nn.Module, reference: Reference, batch_size: int = 8, hidden: list | None = None) -> Scores:
    """NLL, KL vs the reference and top-1 agreement of ``model`` (in its current morph state).

    ``hidden``: a list that receives each batch's final hidden state (after the last norm) from the
    same forward passes, for measures that need both (chapter 1's MDS)."""
    nll, kl, top1 = [], [], []
    for start, target, logp, *rest in _batches(model, reference.ids, batch_size, with_hidden=hidden is not None):
        if hidden is not None:
            hidden.append(rest[0])
        ref = reference.logp[start:start + logp.shape[0]].float()
        nll.append(-logp.gather(-1, target[..., None])[..., 0].mean(dim=1).cpu())
        kl.append((ref.exp() * (ref - logp)).sum(-1).mean(dim=1).cpu())
        top1.append((ref.argmax(-1) == logp.argmax(-1)).float().mean(dim=1).cpu())
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return Scores(cat(nll), cat(kl), cat(top1))


@torch.no_grad()
def greedy_steps(model: nn.Module, prompts: torch.Tensor):
    """The library's one Hugging Face greedy decode, one step per ``next()``: plain argmax with the model's
    KV cache (end-of-sequence is a token like any other). The first ``next()`` runs the equal-length
    prompts [n, P] (no padding) and every later one a single-token step; each yields the next token of
    every prompt, [n, 1] on the model's device. A caller may change the model between steps (chapter 4
    swaps layers there) or time each one."""
    out = model(prompts.to(_device(model)), use_cache=True)
    while True:
        nxt = out.logits[:, -1:].argmax(-1)
        yield nxt
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)


def greedy_tokens(model: nn.Module, prompts: torch.Tensor, new_tokens: int, batch_size: int | None = None) -> torch.Tensor:
    """Greedy continuations [n, new_tokens] (int64, on the CPU) of equal-length prompts [n, P]:
    :func:`greedy_steps` on ``batch_size`` prompts at a time (default: all at once)."""
    new_tokens = check_int("new_tokens", new_tokens)
    batch_size = check_int("batch size", batch_size if batch_size is not None else max(1, len(prompts)))
    if prompts.dim() != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise MorphError(f"prompts must be token ids [n, P] with n, P >= 1, got shape {tuple(prompts.shape)}")
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        steps = greedy_steps(model, prompts[start:start + batch_size])
        out.append(torch.cat([next(steps) for _ in range(new_tokens)], dim=1).cpu())
    return torch.cat(out)


def token_match(reference: torch.Tensor, other: torch.Tensor) -> dict[str, np.ndarray]:
    """Per prompt: fraction of equal positions, and common-prefix length."""
    eq = (reference == other)
    prefix = torch.where(eq.all(dim=1), torch.tensor(eq.shape[1]), (~eq).int().argmax(dim=1))
    return {"match": eq.float().mean(dim=1).double().numpy(), "prefix": prefix.double().numpy()}

