"""Held-out quality of the real default model: 16-bit < all-layers INT4, and AWQ-style < RTN."""

import pytest
import torch

from morphlib.eval.metrics import Reference, greedy_tokens, score, token_match
from morphlib.morph import QuantConfig, prepare_morphing


@pytest.fixture(scope="module")
def reference(model, heldout):
    return Reference.compute(model, heldout.ids)


@pytest.mark.slow
def test_heldout_perplexity_fp16_rtn_awq(model, calibration, reference, capsys):
    results = {"fp16": reference.ppl}
    for method in ("rtn", "awq"):
        config = QuantConfig(group_size=64, method=method, awq_grid=10, awq_tokens=1024)
        morpher = prepare_morphing(model, config, calibration=calibration.ids, progress=False)
        morpher.swap(range(morpher.num_layers))
        try:
            results[method] = score(model, reference).ppl
        finally:
            morpher.restore()
    with capsys.disabled():
        print("\nheld-out perplexity (8 x 256 tokens, Moby-Dick + SOTU 2001-2021): "
              + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    assert results["fp16"] < results["awq"] < results["rtn"]
    assert 20 < results["fp16"] < 80  # sanity: SmolLM2-135M on literary/political prose


def test_reference_scores_itself_perfectly(model, reference):
    s = score(model, reference)
    assert abs(s.ppl - reference.ppl) < 1e-9
    assert float(s.kl.max()) < 1e-3 and float(s.top1.min()) > 0.99


def test_one_layer_swap_costs_little_and_kl_is_positive(model, reference, rtn_morpher):
    with rtn_morpher.morphed([15]):
        s = score(model, reference)
    assert 0 < float(s.kl.mean()) < 0.1
    assert abs(s.ppl / reference.ppl - 1) < 0.05
    assert s.top1.mean() > 0.85


def test_greedy_token_match(model, heldout, rtn_morpher):
    prompts = heldout.ids[:2, :16]
    ref = greedy_tokens(model, prompts, 12)
    assert ref.shape == (2, 12)
    same = token_match(ref, greedy_tokens(model, prompts, 12))
    assert same["match"].tolist() == [1.0, 1.0] and same["prefix"].tolist() == [12, 12]
    with rtn_morpher.morphed(range(30)):
        other = greedy_tokens(model, prompts, 12)
    m = token_match(ref, other)
    assert (m["match"] <= 1).all() and (m["prefix"] <= 12).all()


def test_capital_of_france(model, tok):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = greedy_tokens(model, ids, 8)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.gpu
def test_greedy_tokens_are_hf_generates_on_chapter_2s_gpu_prompts():
    """Chapter 2's token match once came from HF ``generate`` (EOS suppressed by min_new_tokens, the head run
    on the last prompt position only); ``greedy_tokens`` is plain argmax with the KV cache. On chapter 2's
    GPU profile (16 held-out prompts x 32 tokens, 32 new, bf16, deterministic cuBLAS) both give the same
    tokens for the 16-bit model and morphed ones, so the published numbers do not move."""
    from morphlib.eval.corpus import make_windows
    from morphlib.models import load_model
    from morphlib.runtime import make_deterministic

    make_deterministic()
    model, tok = load_model("smollm2-135m", device="cuda")
    held = make_windows(tok, "heldout", 64, 512, seed=0)
    prompts = held.ids[:: len(held) // 16][:16, :32]
    morpher = prepare_morphing(model, QuantConfig(group_size=64), progress=False)
    for layers in ([], [10, 11], list(range(0, 30, 2)), list(range(30))):
        with morpher.morphed(layers):
            dev = prompts.cuda()
            old = model.generate(dev, attention_mask=torch.ones_like(dev), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=0, num_beams=1)[:, 32:].cpu()
            assert torch.equal(greedy_tokens(model, prompts, 32), old), layers
