"""Any model, correct or refused: the default model's numbers pinned bitwise, the sanity gate (passing and
refusing), the BOS rule, Gemma-3 270M's real weights, and a tiny random-weight model of each supported family
through AWQ, Morpher and the sensitivity passes."""

import copy
import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from morphlib.errors import MorphError
from morphlib.eval.corpus import domain_windows, make_windows, special_prefix, tokenize_text
from morphlib.eval.metrics import Reference, score, window_nll
from morphlib.models import load_model, synthetic_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.sanity import check_model
from morphlib.structure import check_family, decoder_layers, layer_linears, lm_head_logits, one_pass_exact

# ----------------------------------------------------------------------------- SmolLM2: nothing moved
# Recorded with the code before BOS/sanity/family support (commit c33df86), on the project's CPU machines.
# Token ids are platform-independent; the float values are those of this CPU build of torch (bf16 on CPU).
PINNED_WINDOWS = {
    ("calibration", 4, 256): "9ba11e2d440fb101", ("heldout", 8, 256): "33da60ee1781fdec",
    ("calibration", 4, 128): "513d1bbe1831eb66", ("heldout", 6, 128): "283050ddbaf81ba4",
    ("calibration", 32, 512): "e463d060a2ec90ec", ("heldout", 64, 512): "7548148c367d0868",
}
PINNED_DOMAIN = {("email-2002", "heldout"): "3a934e2903b76f18", ("email-2002", "calibration"): "9b90c2546c767ef5",
                 ("moby-dick", "calibration"): "5c806b48164f5c7b"}
PINNED_TEXT = "444c8df96934f510"  # tokenize_text(tok, "The capital of France is Paris. Call me Ishmael.")
PINNED_NLL = ["0x1.24a78e0000000p+2", "0x1.2c29180000000p+2", "0x1.5d47140000000p+1", "0x1.dbfe200000000p+1"]
PINNED_KL = ["-0x1.6703b40000000p-11", "0x1.84a9f00000000p-11", "0x1.a01d3c0000000p-13", "-0x1.c429740000000p-14"]
PINNED_HIDDEN = "23fae148b69b95fe"  # final hidden states from score(..., hidden=[])
PINNED_REF_LOGP = "64bcfe77111f29a2"
PINNED_AWQ = "ed6bc90426d97c8e"  # awq_scales(grid=4, 128 tokens) on calibration 4x64 windows [:2]
PINNED_LTS, PINNED_ANGULAR = "05691a998ffe41dd", "c927ba93b063101b"


def _windows_hash(w) -> str:
    digest = hashlib.sha256(w.ids.numpy().tobytes())
    digest.update(json.dumps([w.doc, w.domain]).encode())
    return digest.hexdigest()[:16]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().numpy().tobytes()).hexdigest()[:16]


def test_smollm2_follows_its_convention_no_bos(tok):
    assert special_prefix(tok) == []  # add_bos_token=False: the tokenizer's convention adds nothing
    assert tok("Hello there")["input_ids"] == tok("Hello there", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_windows_unchanged(tok):
    for (split, n, length), want in PINNED_WINDOWS.items():
        w = make_windows(tok, split, n, length, seed=0)
        assert w.prefix_len == 0 and len(w) == n and _windows_hash(w) == want, (split, n, length)
    held = make_windows(tok, "heldout", 64, 512, seed=0)
    for (dom, role), want in PINNED_DOMAIN.items():
        n = 32 if role == "heldout" else 16
        w = domain_windows(tok, dom, n, 512, seed=0, role=role, exclude_docs=held.doc if role == "calibration" else ())
        assert _windows_hash(w) == want, (dom, role)
    text = tokenize_text(tok, "The capital of France is Paris. Call me Ishmael.")
    assert hashlib.sha256(text.numpy().tobytes()).hexdigest()[:16] == PINNED_TEXT


def test_smollm2_scores_bitwise_unchanged(model, tok):
    ids = make_windows(tok, "heldout", 4, 64, seed=0).ids
    nll = window_nll(model, ids, batch_size=2)
    ref = Reference.compute(model, ids, 2)
    hidden = []
    sc = score(model, ref, 2, hidden=hidden)
    assert [float(x).hex() for x in nll] == PINNED_NLL
    assert [float(x).hex() for x in sc.nll] == PINNED_NLL
    assert [float(x).hex() for x in sc.kl] == PINNED_KL
    assert [float(x).hex() for x in score(model, ref, 2).nll] == PINNED_NLL
    assert _sha(torch.cat(hidden)) == PINNED_HIDDEN and _sha(ref.logp) == PINNED_REF_LOGP
    assert one_pass_exact(model)  # Llama: the one-pass head path stays the one used before


@pytest.mark.slow
def test_smollm2_awq_and_layer_passes_bitwise_unchanged(model, tok, rtn_morpher):
    from morphlib.awq import awq_scales
    from morphlib.select.sensitivity import layer_passes

    ids = make_windows(tok, "calibration", 4, 64, seed=0).ids
    scales = awq_scales(model, ids[:2], 64, grid=4, max_tokens=128, progress=False)
    digest = hashlib.sha256()
    for li in sorted(scales):
        for name in sorted(scales[li]):
            digest.update(name.encode())
            digest.update(scales[li][name].numpy().tobytes())
    assert digest.hexdigest()[:16] == PINNED_AWQ
    passes = layer_passes(model, rtn_morpher, ids, batch_size=2)
    assert hashlib.sha256(passes["lts"].tobytes()).hexdigest()[:16] == PINNED_LTS
    assert hashlib.sha256(passes["angular"].tobytes()).hexdigest()[:16] == PINNED_ANGULAR


# ----------------------------------------------------------------------------- the sanity gate


def test_gate_passes_on_smollm2_and_is_recorded(model):
    m = model.morphlib_sanity  # the conftest load ran the gate (check=True is the default)
    assert m["passed"] and m["family"] == "llama" and m["prefix"] == []
    assert 5 < m["ppl"] < m["max_ppl"] and m["round_trip"] and m["chars_per_token"] > 4
    assert "Paris" in m["continuation"] and m["degenerate"] is None
    assert m["bos_probe"]["ppl_other"] * 1.5 > m["bos_probe"]["ppl_convention"]
    json.dumps(m)  # recordable in a run's provenance as is


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_gate_refuses_a_broken_tokenizer(model, tok):
    """SmolLM2's tokenizer with its merges lost: byte-level pieces, 1 character per token."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["model"]["merges"] = []
    broken = copy.deepcopy(tok)
    broken._tokenizer = Tokenizer.from_str(json.dumps(spec))
    saved = model.morphlib_sanity
    try:
        with pytest.raises(MorphError, match="failed the sanity check") as exc:
            check_model(model, broken, name="smollm2-135m")
    finally:
        model.morphlib_sanity = saved  # leave the fixture's record as it was
    assert "likely cause: tokenizer" in _one_line(exc)


def test_gate_refuses_wrong_weights(tok):
    random_model = synthetic_model("smollm2-135m", num_layers=2, device="cpu")
    with pytest.raises(MorphError) as exc:
        check_model(random_model, tok, name="random")
    text = _one_line(exc)
    assert "16-bit perplexity" in text and "likely cause: wrong weights" in text
    assert random_model.morphlib_sanity["passed"] is False


def test_gate_names_dtype_on_non_finite_logits(model, tok):
    norm = model.get_decoder().norm
    handle = norm.register_forward_hook(lambda mod, args, out: out * float("nan"))
    saved = model.morphlib_sanity
    try:
        with pytest.raises(MorphError) as exc:
            check_model(model, tok)
    finally:
        handle.remove()
        model.morphlib_sanity = saved
    assert "likely cause: dtype" in _one_line(exc)


def test_load_without_check(tok):
    m, _ = load_model("smollm2-135m", device="cpu", check=False)
    assert m.morphlib_sanity is None


# ----------------------------------------------------------------------------- Gemma-3 270M, real weights


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    return load_model("gemma3-270m", device="cpu")


def test_gemma_loads_and_passes_the_gate(gemma):
    model, tok = gemma
    m = model.morphlib_sanity
    assert type(model).__name__ == "Gemma3ForCausalLM" and m["family"] == "gemma3_text"
    assert m["passed"] and m["prefix"] == [tok.bos_token_id] and m["prefix_tokens"] == ["<bos>"]
    assert m["ppl"] < 30 and m["bos_probe"]["ppl_other"] > 3 * m["bos_probe"]["ppl_convention"]
    assert len(decoder_layers(model)) == 18 and one_pass_exact(model)


def test_gemma_tokenizer_is_sentencepiece_bpe_and_round_trips(gemma):
    _, tok = gemma
    pieces = tok.convert_ids_to_tokens(tok("The capital of France is", add_special_tokens=False)["input_ids"])
    assert pieces == ["The", "▁capital", "▁of", "▁France", "▁is"]
    assert tok.convert_ids_to_tokens(tok("a\n\nb  c\td")["input_ids"]) == ["<bos>", "a", "\n\n", "b", "  ", "c", "\t", "d"]
    for text in ["Call me Ishmael. Some years ago—never mind how long precisely—having little or no money,",
                 "  leading spaces,\ttabs,\n\n\nnewlines and trailing spaces   ", "Digits 1234567890 and 3.14159",
                 "Ünïcödé, 中文, emoji 🙂🐳, math ∑∫, rare ǅ꙰"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    assert len("The capital of France is") / 5 > 4  # ~4.6 characters per token on English


def test_gemma_windows_start_with_bos_and_heldout_ppl_is_sane(gemma):
    model, tok = gemma
    held = make_windows(tok, "heldout", 4, 128, seed=0)
    assert held.prefix_len == 1 and len(held) == 4 and (held.ids[:, 0] == tok.bos_token_id).all() and held.ids.shape == (4, 128)
    assert (held.ids[:, 1:] != tok.bos_token_id).all()
    ppl_bos = math.exp(window_nll(model, held.ids, 4).mean())
    ppl_without = math.exp(window_nll(model, held.ids[:, 1:], 4).mean())
    assert ppl_bos < 80 and ppl_without > 2 * ppl_bos, (ppl_bos, ppl_without)
    assert tokenize_text(tok, "Hello")[0, 0] == tok.bos_token_id
    with pytest.raises(MorphError, match="at least 3 tokens"):
        make_windows(tok, "heldout", 1, 2)


def test_gemma_swap_restore_bitwise(gemma):
    model, tok = gemma
    ids = make_windows(tok, "heldout", 2, 32, seed=1).ids
    before = {n: p.detach().clone() for n, p in decoder_layers(model)[4].named_parameters()}
    with torch.no_grad():
        ref = model(ids).logits
    morpher = prepare_morphing(model, QuantConfig(group_size=64), progress=False)
    report = morpher.swap([3, 4, 5])
    assert report.freed_bytes > 0
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref)
    morpher.restore()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    for n, p in decoder_layers(model)[4].named_parameters():
        assert torch.equal(p, before[n])


def test_gate_refuses_gemma_without_bos(gemma):
    from tokenizers import processors

    model, tok = gemma
    no_bos = copy.deepcopy(tok)
    no_bos._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    assert special_prefix(no_bos) == []
    saved = model.morphlib_sanity
    try:
        with pytest.raises(MorphError) as exc:
            check_model(model, no_bos, name="gemma3-270m")
    finally:
        model.morphlib_sanity = saved
    assert "likely cause: missing BOS" in _one_line(exc)


# ----------------------------------------------------------------------------- tiny random-weight families


def _tiny(kind: str):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**common, head_dim=32, sliding_window=16,
                                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=32, sliding_window=16, final_logit_softcapping=30.0),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=32),
        "mistral": lambda: tf.MistralConfig(**common),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
    }
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[kind]()).to(torch.bfloat16).eval().requires_grad_(False)
    model.morphlib_name = "shape:tiny"  # "shape:" names are never cached on disk (AWQ scales)
    return model


FAMILIES = ["llama", "gemma3_text", "gemma2", "qwen2", "qwen3", "mistral", "phi3"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_tiny_family_awq_morpher_sensitivity(kind):
    from morphlib.select.sensitivity import layer_passes, mds_given, single_layer_costs

    model = _tiny(kind)
    check_family(model)
    layers = decoder_layers(model)
    assert len(layers) == 3 and layers is model.get_decoder().layers
    names = set(layer_linears(layers[0]))
    assert names & {"self_attn.o_proj", "mlp.down_proj"} == {"self_attn.o_proj", "mlp.down_proj"}, names
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    assert one_pass_exact(model), kind  # head + the family's soft-capping == forward()
    with torch.no_grad():
        hidden = model.get_decoder()(ids, use_cache=False).last_hidden_state
        assert torch.equal(lm_head_logits(model, hidden), model(ids, use_cache=False).logits)
    morpher = prepare_morphing(model, QuantConfig(group_size=32, method="awq", awq_grid=4, awq_tokens=64),
                               calibration=ids, progress=False)
    with torch.no_grad():
        ref_logits = model(ids).logits
    morpher.swap([1])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref_logits)
    morpher.restore()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    ref = Reference.compute(model, ids, 2)
    passes = layer_passes(model, morpher, ids, batch_size=2)
    assert passes["lts"].shape == (4, 3) and passes["angular"].shape == (4, 4, 4)
    assert ((passes["lrs"] > 0.5) & (passes["lrs"] <= 1.0 + 1e-6)).all()
    single = single_layer_costs(model, morpher, ref, batch_size=2, progress=False)
    assert single["dnll"].shape == (4, 3) and single["kl"].min() >= -1e-2
    mds = mds_given(model, morpher, ids, [0], [1, 2], batch_size=2)
    assert set(mds) == {1, 2}
    assert morpher.int4_layers() == []


def test_unsupported_families_are_refused_in_one_line():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(MorphError, match="model family 'gpt2'") as exc:
        check_family(gpt2)
    assert "outside nn.Linear" in _one_line(exc)
    moe = tf.AutoModelForCausalLM.from_config(tf.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=32))
    with pytest.raises(MorphError, match="model family 'qwen2_moe'") as exc:
        check_family(moe)
    assert "outside nn.Linear" in _one_line(exc)


@pytest.mark.parametrize("command", ["layer-costs", "bench", "bench-engine"])
def test_cli_help_describes_the_command_and_every_option_with_its_default(command):
    import re

    out = subprocess.run([sys.executable, "-m", "morphlib", command, "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    usage, options = out.split("\noptions:", 1)
    assert len(usage.split("\n\n")) >= 2, f"{command} has no description"
    entries, current = {}, None
    for line in options.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current:
            entries[current] += " " + line.strip()
    entries.pop("-h")
    assert len(entries) >= 8, entries
    for opt, entry in entries.items():
        what, default = (entry.split(opt, 1)[1].split("(default: ", 1) + [""])[:2]
        assert len(what.split()) >= 3 and default.strip(), (opt, entry)  # says what it does, then its default
    if command == "layer-costs":
        assert {"--texts", "--calibration-texts", "--heldout-texts"} <= entries.keys()
