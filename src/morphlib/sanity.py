"""The sanity gate: a model load used for numbers must show sane 16-bit perplexity and a non-degenerate greedy
continuation on fixed material, or stop with a one-line error naming the likely cause.

``check_model(model, tokenizer)`` (called by ``load_model(..., check=True)``) measures, in the model's own
dtype and on its device, with the arithmetic that scores every experiment (that of ``window_nll``):

* **perplexity** of ``CHECK_TEXT`` (below: 352 words of plain English written for this project, public
  domain, ~400 tokens), tokenized with the tokenizer's own convention for special tokens (BOS for Gemma,
  nothing for SmolLM2: ``morphlib.eval.corpus.tokenize_text``). Sane: between ``MIN_PPL`` and
  ``max_ppl(parameters)``;
* the **BOS convention**: the perplexity of the text's first ``BOS_PROBE_TOKENS`` tokens with the
  tokenizer's convention and with the other one (a BOS added when the tokenizer adds none and has one,
  or the prefix removed). Wrong: the other convention is more than ``BOS_RATIO`` times better;
* a **greedy continuation** of ``CHECK_PROMPT`` ("The capital of France is", ``GREEDY_TOKENS`` tokens,
  no sampling). Degenerate: one token makes up more than half of it, a loop of at most two distinct
  tokens, only special tokens, or no letter or digit at all.

On failure it tells the likely cause from cheap extra measurements, in this order: non-finite logits
(**dtype**: e.g. float16 overflow); the tokenizer does not round-trip the text or cuts English into
fewer than ``MIN_CHARS_PER_TOKEN`` characters per token (**tokenizer**); the perplexity becomes sane
with a BOS added (**missing BOS**) or removed (**unexpected BOS**); otherwise **wrong weights or an
unsupported architecture**. The measurements are kept in ``model.morphlib_sanity`` (a dict, for the
run's provenance) whether the check passes or not.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from morphlib.errors import MorphError
from morphlib.eval.corpus import special_prefix, tokenize_text
from morphlib.eval.metrics import greedy_tokens
from morphlib.structure import family

CHECK_TEXT = (
    "The town stands on the north bank of a wide, slow river, about two days' walk from the sea. Most of "
    "the people who live there work on the farms around it, in the mill, or in the small shops along the "
    "main street. In the spring, when the snow melts in the hills, the river rises and sometimes floods "
    "the low fields near the water. For that reason the older houses were built on higher ground, and the "
    "church, the school and the market square sit at the top of the hill.\n\n"
    "Every Saturday morning the square is full of stalls. Farmers bring eggs, cheese, apples and "
    "potatoes, and the baker sells bread that was baked before dawn. Children run between the tables "
    "while their parents talk about the weather, the price of grain and the news from the city. By noon "
    "most of the food has been sold, and the farmers pack their empty baskets into their carts and drive "
    "home before it gets dark.\n\n"
    "The mill is the oldest building in the town. It was built more than two hundred years ago, when the "
    "river was the only source of power. A large wooden wheel turned a pair of heavy stones that ground "
    "wheat into flour. Today the wheel is driven by an electric motor, but the stones are the same, and "
    "the miller still checks the flour by rubbing it between his fingers.\n\n"
    "In the winter the days are short and cold. People stay inside by the fire, read books, mend their "
    "tools and plan the work for the coming year. When the first warm day arrives, everyone goes outside "
    "at once. The fields are ploughed, the seeds are sown, and the cycle of the year begins again.\n\n"
    "Visitors who come to the town often say that nothing ever changes there. That is not quite true. A "
    "new road was opened last year, a doctor now visits twice a week, and the school has a computer room. "
    "Still, the rhythm of life follows the seasons, the river and the market, as it has for a very long "
    "time."
)
CHECK_PROMPT = "The capital of France is"
GREEDY_TOKENS = 8
MIN_PPL = 1.5  # below this the scored tokens leak into the input (a broken label shift or attention mask)
MIN_CHARS_PER_TOKEN = 3.0  # every subword tokenizer of an English-trained LM measured here gives 4-5 on CHECK_TEXT
BOS_PROBE_TOKENS = 128  # text tokens scored under both BOS conventions
BOS_RATIO = 1.5  # the other BOS convention this many times better than the tokenizer's = wrong convention


def max_ppl(parameters: int) -> float:
    """Highest sane 16-bit perplexity on ``CHECK_TEXT`` for a model of ``parameters`` parameters."""
    if parameters < 500e6:
        return PPL_LIMITS[0]
    if parameters < 3e9:
        return PPL_LIMITS[1]
    return PPL_LIMITS[2]


PPL_LIMITS = (60.0, 40.0, 25.0)


@torch.no_grad()
def _token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every predicted position of one sequence [T-1] (the arithmetic of ``window_nll``)."""
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    return -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[0, :, 0].cpu()


def _ppl_of(nll: torch.Tensor) -> float:
    mean = float(nll.mean())
    return math.exp(mean) if math.isfinite(mean) else math.inf


def degenerate(tokens: list[int], text: str, special_ids) -> str | None:
    """Why a greedy continuation is degenerate, or None when it is not."""
    if not tokens:
        return "empty"
    top = max(tokens.count(t) for t in set(tokens))
    if top * 2 > len(tokens):
        return f"one token repeated ({top} of {len(tokens)})"
    if len(tokens) >= 6 and len(set(tokens)) <= 2:
        return f"a loop of {len(set(tokens))} tokens"
    if all(t in special_ids for t in tokens):
        return "only special tokens"
    if not any(ch.isalnum() for ch in text):
        return "no letter or digit"
    return None


def measure(model: nn.Module, tokenizer) -> dict:
    """The gate's measurements (no verdict): perplexity, tokens, the prefix used, the greedy continuation."""
    t0 = time.perf_counter()
    prefix = special_prefix(tokenizer)
    ids = tokenize_text(tokenizer, CHECK_TEXT)
    text_ids = ids[0, len(prefix):].tolist()
    nll = _token_nll(model, ids)
    ppl = _ppl_of(nll)
    finite = bool(torch.isfinite(nll).all())
    # the convention's NLLs of text tokens 1..k-1 come from the same pass (causal: as in a shorter pass)
    bos_probe = _bos_probe(model, tokenizer, prefix, text_ids[:BOS_PROBE_TOKENS],
                           nll[len(prefix):len(prefix) + BOS_PROBE_TOKENS - 1])
    prompt = tokenize_text(tokenizer, CHECK_PROMPT)
    cont = greedy_tokens(model, prompt, GREEDY_TOKENS)[0].tolist()
    cont_text = tokenizer.decode(cont, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    parameters = sum(p.numel() for p in model.parameters())
    return {"ppl": ppl, "finite": finite, "tokens": int(ids.shape[1]), "prefix": prefix,
            "prefix_tokens": tokenizer.convert_ids_to_tokens(prefix) if prefix else [],
            "chars_per_token": len(CHECK_TEXT) / max(1, len(text_ids)),
            "round_trip": tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == CHECK_TEXT,
            "prompt": CHECK_PROMPT, "continuation": cont_text, "continuation_ids": cont,
            "degenerate": degenerate(cont, cont_text, set(tokenizer.all_special_ids)), **bos_probe,
            "parameters": parameters, "max_ppl": max_ppl(parameters), "min_ppl": MIN_PPL,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seconds": time.perf_counter() - t0}


def _bos_probe(model: nn.Module, tokenizer, prefix: list[int], text_ids: list[int], own_nll: torch.Tensor) -> dict:
    """Perplexity of text tokens 1..k-1 (the first one is not predicted without a prefix) under the tokenizer's
    convention (``own_nll``: their NLLs from the main pass) and under the other one (one more pass)."""
    bos = tokenizer.bos_token_id
    if prefix:
        other, label = [], "without " + "".join(tokenizer.convert_ids_to_tokens(prefix))
    elif bos is not None:
        other, label = [bos], f"with {tokenizer.bos_token}"
    else:
        return {"bos_probe": None}
    own = _ppl_of(own_nll)
    alt_nll = _token_nll(model, torch.tensor([other + text_ids]))
    alt = _ppl_of(alt_nll[len(other):len(other) + len(text_ids) - 1])  # the same text tokens 1..k-1
    return {"bos_probe": {"tokens": len(text_ids), "ppl_convention": own, "ppl_other": alt, "other": label}}


def _cause(model: nn.Module, tokenizer, m: dict) -> str:
    """The likely cause of a failed check, from cheap extra measurements (see the module doc)."""
    if not m["finite"]:
        return f"dtype: non-finite logits in {m['dtype']} (overflow? load with dtype=torch.bfloat16 or float32)"
    if not m["round_trip"] or m["chars_per_token"] < MIN_CHARS_PER_TOKEN:
        return (f"tokenizer: {m['chars_per_token']:.2f} characters per token on English text "
                f"(expected >= {MIN_CHARS_PER_TOKEN:.0f}), round trip {'ok' if m['round_trip'] else 'FAILS'}")
    probe = m["bos_probe"]
    if probe and probe["ppl_other"] * BOS_RATIO < probe["ppl_convention"]:
        if m["prefix"]:
            return f"unexpected BOS: {probe['other']} the perplexity is {probe['ppl_other']:.1f}"
        return (f"missing BOS: {probe['other']} first the perplexity is {probe['ppl_other']:.1f} instead of "
                f"{probe['ppl_convention']:.1f} (the tokenizer does not add it: set add_bos_token or its post-processor)")
    return "wrong weights or an unsupported architecture/config (tokenizer and BOS look fine)"


def check_model(model: nn.Module, tokenizer, name: str | None = None, raise_on_failure: bool = True) -> dict:
    """Run the gate; record the result in ``model.morphlib_sanity``; raise a one-line MorphError on failure."""
    m = measure(model, tokenizer)
    problems = []
    if not (m["finite"] and MIN_PPL <= m["ppl"] <= m["max_ppl"]):
        problems.append(f"16-bit perplexity {m['ppl']:.1f} on the check text (sane: {MIN_PPL}..{m['max_ppl']:.0f} "
                        f"for {m['parameters'] / 1e6:.0f} M parameters)")
    probe = m["bos_probe"]
    if probe and probe["ppl_other"] * BOS_RATIO < probe["ppl_convention"]:
        problems.append(f"perplexity {probe['ppl_other']:.1f} {probe['other']} vs {probe['ppl_convention']:.1f} with "
                        f"the tokenizer's convention on the first {probe['tokens']} tokens")
    if m["degenerate"]:
        problems.append(f"greedy {CHECK_PROMPT!r} -> {m['continuation']!r} is degenerate ({m['degenerate']})")
    m["passed"] = not problems
    m["cause"] = None if not problems else _cause(model, tokenizer, m)
    m["family"] = family(model)
    model.morphlib_sanity = m
    if problems and raise_on_failure:
        label = name or getattr(model, "morphlib_name", None) or type(model).__name__
        raise MorphError(f"model {label!r} ({m['family']}) failed the sanity check: {'; '.join(problems)}; "
                         f"likely cause: {m['cause']} (load_model(..., check=False) skips this check)")
    return m


def summary(m: dict | None) -> str:
    """One line for logs and pages: what the gate saw."""
    if not m:
        return "sanity check not run"
    probe = m.get("bos_probe")
    bos = (f", {probe['ppl_convention']:.1f} vs {probe['ppl_other']:.1f} {probe['other']} on {probe['tokens']} tokens"
           if probe else "")
    return (f"sanity {'passed' if m['passed'] else 'FAILED'}: ppl {m['ppl']:.2f} on {m['tokens']} tokens "
            f"(<= {m['max_ppl']:.0f}), prefix {m['prefix_tokens'] or 'none'}{bos}, greedy {m['prompt']!r} -> "
            f"{m['continuation']!r}")
