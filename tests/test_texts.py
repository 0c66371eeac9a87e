"""A user's own texts: explicit calibration and held-out sources (files, folders, lists of strings), their
one-line errors, and the chapters' and command line's calibration_texts / heldout_texts."""

import subprocess
import sys

import pytest

from morphbook.experiments import domains, sensitivity, strategies
from morphbook.experiments.base import as_params
from morphlib.errors import MorphError
from morphlib.eval.corpus import make_windows, resolve_texts

RIVER = " ".join(f"The river passed mill number {i} and turned its wheel {i % 7} times." for i in range(150))
SHIP = " ".join(f"Ship log entry {i}: wind from the north at {i % 13} knots, sea calm." for i in range(150))


@pytest.fixture
def own_texts(tmp_path):
    calib = tmp_path / "my_calib"
    calib.mkdir()
    (calib / "a.txt").write_text(RIVER[: len(RIVER) // 2])
    (calib / "b.txt").write_text(RIVER[len(RIVER) // 2:])
    held = tmp_path / "my_eval.txt"
    held.write_text(SHIP)
    return str(calib), str(held)


def test_explicit_texts_give_windows_from_their_own_split_only(tok, own_texts):
    texts = {"calibration": own_texts[0], "heldout": own_texts[1]}
    cal = make_windows(tok, "calibration", 4, 32, texts=texts)
    held = make_windows(tok, "heldout", 4, 32, texts=texts)
    assert set(cal.domain) == {"my_calib"} and set(held.domain) == {"my_eval"}
    assert len(set(cal.doc)) == 2, "windows are drawn from as many documents as there are"
    assert all(tok.decode(row) in RIVER for row in cal.ids.tolist())
    assert all(tok.decode(row) in SHIP for row in held.ids.tolist())


def test_lists_of_strings_and_named_domains(tok):
    held = make_windows(tok, "heldout", 4, 32, texts={"heldout": [RIVER, "  ", SHIP]})
    assert set(held.domain) == {"heldout"} and set(held.doc) == {"heldout/0", "heldout/2"}  # empty ones skipped
    named = make_windows(tok, "heldout", 4, 32, texts={"heldout": {"river": [RIVER], "ship": [SHIP]}})
    assert named.domain == ["river", "river", "ship", "ship"]
    assert all(tok.decode(row) in (RIVER if dom == "river" else SHIP) for row, dom in zip(named.ids.tolist(),
                                                                                           named.domain))


@pytest.mark.parametrize("source, match", [
    ("{tmp}/missing.txt", "heldout texts '.*missing.txt': no such file or folder"),
    ("{tmp}/empty.txt", "heldout texts '.*empty.txt': no non-empty text"),
    ([], r"heldout texts \(a list of 0 strings\): no non-empty text"),
    (["Too short."], "domain 'heldout': no text is long enough for one window of 32 tokens"),
    (3, "heldout texts: expected a .txt file or folder, a list of strings or {domain: source}, got int"),
])
def test_bad_sources_are_one_line_errors(tok, tmp_path, source, match):
    (tmp_path / "empty.txt").write_text(" \n")
    if isinstance(source, str):
        source = source.format(tmp=tmp_path)
    with pytest.raises(MorphError, match=match) as err:
        make_windows(tok, "heldout", 2, 32, texts={"calibration": [RIVER], "heldout": source})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("texts, match", [
    ({"calibration": [RIVER], "eval": [SHIP]}, "unknown split 'eval': the keys are 'calibration' and 'heldout'"),
    ({"calibration": [RIVER]}, "no source for the 'heldout' split"),
])
def test_bad_split_keys_are_one_line_errors(tok, texts, match):
    with pytest.raises(MorphError, match=match):
        make_windows(tok, "heldout", 2, 32, texts=texts)


def test_resolve_texts():
    assert resolve_texts("default") == "default" and resolve_texts("my.txt") == "my.txt"
    assert resolve_texts("default", "c/", "h.txt") == {"calibration": "c/", "heldout": "h.txt"}
    with pytest.raises(MorphError, match="go together: give both or neither"):
        resolve_texts("default", "c/", None)
    with pytest.raises(MorphError, match="texts 'hf:x' and explicit calibration/held-out texts exclude each other"):
        resolve_texts("hf:x", "c/", "h.txt")


@pytest.mark.parametrize("module", [sensitivity, strategies])
def test_chapter_configs_check_and_record_explicit_texts(module):
    default = module.Config.for_profile("cpu")
    assert default.calibration_texts is None and default.heldout_texts is None
    cfg = module.Config.for_profile("cpu", calibration_texts="~/calib", heldout_texts="eval.txt")
    params = as_params(cfg)
    assert (params["texts"], params["calibration_texts"], params["heldout_texts"]) == ("default", "~/calib", "eval.txt")
    with pytest.raises(MorphError, match="go together"):
        module.Config.for_profile("cpu", heldout_texts="eval.txt")
    with pytest.raises(MorphError, match="exclude each other"):
        module.Config.for_profile("cpu", texts="my.txt", calibration_texts="c/", heldout_texts="h.txt")


def test_domain_checks_refuse_chapter2_run_on_explicit_texts(tmp_path):
    from morphbook.experiments.base import Result
    from morphbook.publish.inputs import load_inputs
    from morphbook.publish.store import save_result
    from morphlib import fingerprint

    params = {"profile": "cpu", "texts": "default", "calibration_texts": "c/", "heldout_texts": "h.txt"}
    files = {name: {} for name in ("sets.json", "window_nll.json", "windows.json")}
    save_result("strategies", Result(params, {"per_k": {}}, files), tmp_path, recording=fingerprint.Recording())
    with pytest.raises(MorphError, match="need the book's own corpus"):
        domains.run(domains.Config.for_profile("cpu"), load_inputs("domains", tmp_path))


def test_cli_explicit_texts_go_together():
    proc = subprocess.run([sys.executable, "-m", "morphlib", "layer-costs", "--calibration-texts", "c/"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: calibration and held-out texts go together: give both or neither"
