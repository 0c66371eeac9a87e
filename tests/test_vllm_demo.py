"""Chapter 6 fallback: greedy token match under real INT4 swaps of the default model; the vLLM hook."""

import pytest
import torch

from morphlib.errors import MorphError
from morphlib.vllm_demo import MatchConfig, conditions, headline, run_vllm_engine, token_match_experiment, vllm_status


def test_conditions():
    c = conditions(30, (1, 2, 8))
    assert ("block", 1, [14]) in c and not any(n == "scattered" and k == 1 for n, k, _ in c)
    assert ("block", 2, [14, 15]) in c and ("scattered", 2, [7, 22]) in c
    assert c[-1] == ("all", 30, list(range(30)))
    with pytest.raises(MorphError, match="out of range"):
        conditions(30, (30,))


def test_vllm_hook_is_honest():
    with pytest.raises(MorphError, match="vLLM engine path not implemented yet"):
        run_vllm_engine()
    status = vllm_status(try_import=False)
    assert set(status) == {"installed", "importable", "version", "error"} and status["importable"] is False


def test_token_match_two_layer_swap(model, heldout, rtn_morpher):
    prompts = heldout.ids[:2, :16]
    rows, per_prompt = token_match_experiment(model, rtn_morpher, prompts,
                                              MatchConfig(counts=(2,), include_all=False, new_tokens=8))
    by = {r["condition"]: r for r in rows}
    assert list(by) == ["fp16", "fp16 repeat", "block", "scattered"]
    assert by["fp16"]["match"] == 1.0 and by["fp16 repeat"]["match"] == 1.0  # greedy 16-bit is deterministic
    assert by["fp16 repeat"]["prefix"] == 8.0
    assert by["block"]["layers"] == "14 15" and by["scattered"]["layers"] == "7 22"
    assert all(0.0 <= r["match"] <= 1.0 and r["ms_per_token"] > 0 for r in rows)
    assert len(per_prompt) == 4 * 2
    assert rtn_morpher.int4_layers() == []  # every condition restored the 16-bit model
    h = headline(rows, (2,), {"importable": False})
    assert h["block_match_2"]["value"] == by["block"]["match"] and h["vllm_importable"] is False
    assert h["engine"].startswith("HF transformers")


def test_token_match_rejects_a_morphed_model(model, rtn_morpher):
    with rtn_morpher.morphed([3]):
        with pytest.raises(MorphError, match="restore"):
            token_match_experiment(model, rtn_morpher, torch.zeros(1, 4, dtype=torch.long))
