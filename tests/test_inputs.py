"""Bad input gives a one-line error (no traceback), from the library and from the command line."""

import subprocess
import sys

import pytest
import torch

from morphlib.eval.corpus import make_windows, tokenize_text
from morphlib.errors import MorphError
from morphlib.eval.metrics import greedy_tokens, window_nll
from morphlib.models import load_model, synthetic_model
from morphlib.morph import QuantConfig
from morphlib.shapes import SHAPES, shape_layer_bytes


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "morphlib", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cli_unknown_model():
    assert_one_line_error(run_cli("layer-costs", "--model", "no-such-org/no-such-model"), "unknown model")


def test_cli_bad_group_size():
    assert_one_line_error(run_cli("layer-costs", "--group-size", "128"), "does not divide K=576")


def test_cli_layer_out_of_range():
    assert_one_line_error(run_cli("layer-costs", "--layers", "3", "30"), "must be an integer in [0, 29], got 30")


def test_cli_empty_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(run_cli("layer-costs", "--texts", str(empty)), "no non-empty")


def test_empty_text_and_missing_paths(tok):
    with pytest.raises(MorphError, match="empty"):
        tokenize_text(tok, "")
    with pytest.raises(MorphError, match="no such file"):
        make_windows(tok, "heldout", 2, 16, texts="/nonexistent/texts")
    with pytest.raises(MorphError, match="GGUF file not found"):
        load_model("/nonexistent/model.gguf")


def test_window_length_too_short(tok):
    with pytest.raises(MorphError, match="at least 2 tokens"):
        make_windows(tok, "heldout", 1, 1)


def test_cli_unknown_builtin_lists_the_families():
    assert_one_line_error(run_cli("layer-costs", "--model", "no-such-model"), "gemma3-270m")


def test_text_file_source_is_split_in_two(tok, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("word " * 4000)
    cal = make_windows(tok, "calibration", 2, 32, texts=str(f))
    held = make_windows(tok, "heldout", 2, 32, texts=str(f))
    assert cal.doc[0].endswith("#a") and held.doc[0].endswith("#b")


def test_default_split_domains_are_disjoint(tok):
    cal = make_windows(tok, "calibration", 6, 64)
    held = make_windows(tok, "heldout", 6, 64)
    assert set(held.domain) == {"moby-dick", "sotu-2001-2021"}
    assert all(int(d.split("/")[1][:4]) < 2000 for d in cal.doc)
    assert not set(cal.doc) & set(held.doc)
    again = make_windows(tok, "heldout", 6, 64)
    assert torch.equal(held.ids, again.ids), "windows must be deterministic for a seed"


def test_shapes_bytes_match_public_configs():
    # TinyLlama-1.1B: 84 MiB of 16-bit weights per decoder layer (platform notes)
    assert shape_layer_bytes("tinyllama-1.1b")["fp16_bytes"] == 2 * (2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 5632 * 2048)
    assert shape_layer_bytes("llama-2-7b")["fp16_bytes"] == 2 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
    assert all(0.26 < shape_layer_bytes(s)["ratio"] < 0.3 for s in SHAPES)
    with pytest.raises(MorphError, match="unknown model shape"):
        shape_layer_bytes("gpt-5")


def test_synthetic_model_runs():
    m = synthetic_model("tinyllama-1.1b", num_layers=2, dtype=torch.float32, device="cpu")
    out = m(torch.randint(0, 32000, (1, 8))).logits
    assert out.shape == (1, 8, 32000) and torch.isfinite(out).all()


def test_synthetic_model_ties_the_head_as_its_shape_says():
    tied = synthetic_model("smollm2-135m", num_layers=1, dtype=torch.float32, device="cpu")
    untied = synthetic_model("tinyllama-1.1b", num_layers=1, dtype=torch.float32, device="cpu")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_no_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MorphError, match="no CUDA GPU"):
        load_model("smollm2-135m", device="cuda")


@pytest.fixture(scope="module")
def one_layer():
    return synthetic_model("smollm2-135m", num_layers=1, device="cpu")


@pytest.mark.parametrize("call,match", [
    (lambda m: QuantConfig(method="awq", awq_grid=0), r"AWQ grid must be an integer >= 1, got 0"),
    (lambda m: QuantConfig(awq_tokens=True), r"AWQ calibration tokens .* got True"),
    (lambda m: synthetic_model("smollm2-135m", num_layers=0), r"num_layers must be an integer >= 1, got 0"),
    (lambda m: window_nll(m, torch.zeros(2, 4, dtype=torch.long), 0),
     r"batch size must be an integer >= 1, got 0"),
    (lambda m: greedy_tokens(m, torch.zeros(1, 4, dtype=torch.long), 0),
     r"new_tokens must be an integer >= 1, got 0"),
    (lambda m: greedy_tokens(m, torch.zeros(4, dtype=torch.long), 2),
     r"prompts must be token ids \[n, P\]"),
])
def test_bad_counts_are_one_line_errors(one_layer, call, match):
    with pytest.raises(MorphError, match=match) as exc:
        call(one_layer)
    assert "\n" not in str(exc.value)


def test_greedy_tokens_batches_give_the_tokens_of_one_batch(one_layer):
    prompts = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    whole = greedy_tokens(one_layer, prompts, 4)
    assert whole.shape == (3, 4) and whole.dtype == torch.long
    assert torch.equal(greedy_tokens(one_layer, prompts, 4, batch_size=1), whole)
