"""Layers swapped inside a running vLLM engine (chapter 6). The engine tests run only where vLLM is
installed (.venv-vllm: `bash scripts/setup_vllm.sh`; then `.venv-vllm/bin/python -m pytest -q
tests/test_vllm_engine.py`); elsewhere they skip with the reason, and only the checks that need no
vLLM run. One engine for the whole file (about a minute on 2 cores, with vLLM's import and load)."""

import importlib.util

import numpy as np
import pytest
import torch

from morphlib.eval.corpus import make_windows
from morphlib.errors import MorphError
from morphlib import vllm_morph as vm_lib

vm_lib.engine_env()  # before vLLM is imported: in-process engine, project-owned cache folders
try:
    import vllm  # noqa: F401

    WHY_NOT = None
except Exception as exc:  # noqa: BLE001 - any import failure means: skip the engine tests
    WHY_NOT = (f"vLLM cannot be imported here ({type(exc).__name__}); the engine tests run in .venv-vllm "
               "(bash scripts/setup_vllm.sh)")
needs_vllm = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
LAYERS = [4, 5, 20]
_KEEP = []  # engines live until the end of the session: dropping one tears down state the other uses


# ----------------------------------------------------------------------------- no vLLM needed


def test_morpher_without_vllm_is_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "vllm" else real(name, *a, **k))
    with pytest.raises(MorphError) as err:
        vm_lib.VllmMorpher(object())
    assert "\n" not in str(err.value) and "setup_vllm.sh" in str(err.value)


def test_config_checks_once_with_one_line_errors():
    from morphbook.experiments.vllm import Config

    cpu = Config.for_profile("cpu")
    assert cpu.ks == (2, 4) and cpu.prompts > 0 and cpu.swap_method == "repack"
    assert Config.for_profile("gpu").prompts >= 32 and Config.for_profile("gpu").new_tokens >= 64
    assert Config.for_profile("cpu", ks="[4, 2]").ks == (2, 4)  # papermill passes lists as text
    for bad in (dict(profile="tpu"), dict(profile="cpu", group_size=48), dict(profile="cpu", ks=[0]),
                dict(profile="cpu", swap_method="copy"), dict(profile="cpu", prompts=-1),
                dict(profile="cpu", strategies=("block", "lis"))):
        with pytest.raises(MorphError) as err:
            Config.for_profile(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(MorphError, match="unknown parameter"):
        Config.for_profile("cpu", windows=3)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoTokenizer

    from morphlib.models import _export_smollm2

    folder = _export_smollm2()
    llm = vm_lib.make_llm(folder, kv_cache_gib=0.25)
    _KEEP.append(llm)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["The whale rose slowly from the sea, and", "Mr. President, Mr. Speaker, members of Congress:",
             "It was a cold morning when the ship", "The economy of the nation has"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"llm": llm, "folder": folder, "tok": tok, "prompts": prompts,
            "ref": vm_lib.greedy(llm, prompts, 16)}


@pytest.fixture(scope="module")
def morpher(engine):
    return vm_lib.VllmMorpher(engine["llm"])


@pytest.fixture(scope="module")
def int4(morpher):
    """INT4 (RTN g64 asym) round-trip values of LAYERS, from our copy of the original weights."""
    from morphlib.quant.int4 import Int4Linear

    return {li: {n: Int4Linear.from_weight(morpher.original_weight(li, n), group_size=64).dequantize(torch.float32)
                 for n in vm_lib.LINEARS} for li in LAYERS}


@needs_vllm
def test_swap_then_restore_is_exact(engine, morpher, int4):
    llm, prompts, ref = engine["llm"], engine["prompts"], engine["ref"]
    before = morpher.probe()
    report = morpher.swap(int4)
    assert report.layers == LAYERS and report.prefix_cache_reset and report.seconds > 0
    swapped = vm_lib.greedy(llm, prompts, 16)
    assert not np.array_equal(swapped, ref)  # the swap reached the engine
    after = morpher.probe(LAYERS)
    expected = morpher.expected_probe(LAYERS, int4)
    for key, y in after.items():  # every fused module runs on the new values, rows in the right order
        assert torch.allclose(y, expected[key], rtol=1e-4, atol=1e-4), key
    untouched = morpher.probe([3])
    assert all(torch.equal(untouched[k], before[k]) for k in untouched)
    morpher.restore()
    assert morpher.swapped_layers() == []
    restored = morpher.probe()
    assert all(torch.equal(restored[k], before[k]) for k in before)  # bitwise the original kernels
    assert np.array_equal(vm_lib.greedy(llm, prompts, 16), ref)  # 100 % identical tokens


@needs_vllm
def test_reload_method_gives_the_same_tokens(engine, int4):
    llm, prompts = engine["llm"], engine["prompts"]
    repack = vm_lib.VllmMorpher(llm, method="repack")
    repack.swap(int4)
    a = vm_lib.greedy(llm, prompts, 16)
    repack.restore()
    reload = vm_lib.VllmMorpher(llm, method="reload")
    before = reload.probe(LAYERS)
    reload.swap(int4)
    b = vm_lib.greedy(llm, prompts, 16)
    reload.restore()
    assert np.array_equal(a, b)
    assert all(torch.equal(v, before[k]) for k, v in reload.probe(LAYERS).items())
    assert np.array_equal(vm_lib.greedy(llm, prompts, 16), engine["ref"])


@needs_vllm
def test_bad_input_is_one_line_error(morpher, int4):
    w = morpher.original_weight(0, "q_proj")
    in_range = r"must be an integer in \[0, 29\], got "
    cases = [({30: {"q_proj": w}}, in_range + "30"), ({-1: {"q_proj": w}}, in_range + "-1"),
             ({0: {"q_proj": w[:, :64]}}, "shape"), ({0: {"qkv_proj": w}}, "unknown linear"),
             ({"a": {"q_proj": w}}, in_range + "'a'"), ({True: {"q_proj": w}}, in_range + "True"),
             ({}, "at least one layer")]
    for weights, needle in cases:
        with pytest.raises(MorphError, match=needle) as err:
            morpher.swap(weights)
        assert "\n" not in str(err.value)
    with pytest.raises(MorphError, match=in_range + "99"):
        morpher.restore([99])
    with pytest.raises(MorphError, match="unknown swap method"):
        vm_lib.VllmMorpher(morpher.llm, method="copy")
    with pytest.raises(MorphError, match="expected a vllm.LLM"):
        vm_lib.VllmMorpher(object())
    assert morpher.swapped_layers() == []  # nothing was half-applied


@needs_vllm
def test_skipping_the_prefix_cache_reset_gives_stale_output(engine, morpher, int4):
    llm, tok = engine["llm"], engine["tok"]
    block = vm_lib.prefix_cache_info(llm)["block_size"]
    # real text (a repeated sentence is continued the same way by any weights); two full KV blocks of
    # each prompt can come from the cache (measured: stale vs fresh 62.5 % of tokens, stale vs 16-bit 83 %)
    prompts = make_windows(tok, "heldout", 4, 2 * block + 16, seed=3).ids
    llm.reset_prefix_cache()
    vm_lib.greedy(llm, prompts, 16)  # 16-bit KV blocks now in the prefix cache
    morpher.swap(int4, reset_cache=False)
    stale = vm_lib.greedy(llm, prompts, 16)
    llm.reset_prefix_cache()
    fresh = vm_lib.greedy(llm, prompts, 16)
    morpher.restore()
    assert not np.array_equal(stale, fresh)


@needs_vllm
def test_swapped_engine_equals_baked_checkpoint(engine, morpher, int4, tmp_path):
    # last engine test: it starts a second engine, kept alive to the end of the session
    from morphlib.models import load_model

    llm, prompts = engine["llm"], engine["prompts"]
    morpher.swap(int4)
    swapped = vm_lib.greedy(llm, prompts, 16)
    morpher.restore()
    hf, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    vm_lib.write_baked_checkpoint(hf, tok, int4, tmp_path / "baked")
    baked = vm_lib.make_llm(tmp_path / "baked", kv_cache_gib=0.25)
    _KEEP.append(baked)
    assert np.array_equal(vm_lib.greedy(baked, prompts, 16), swapped)
