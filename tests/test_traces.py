"""Trace loading on the real Azure / BurstGPT files (row counts from the traces README) and on broken files."""

import os
from pathlib import Path

import numpy as np
import pytest

from morphlib.errors import MorphError
from morphlib.workloads.traces import TRACE_FILES, binned, burstiness, load_named, load_trace, resolve_traces_dir


# The real traces ship with the package (morphlib/data/traces); they are required: a missing
# folder fails these tests with the loader's one-line error instead of skipping them silently.


def test_real_azure_traces():
    code, conv = load_named("azure-code"), load_named("azure-conv")
    assert (len(code), len(conv)) == (8819, 19366)  # the README's row counts
    assert code.format == conv.format == "azure" and code.dropped == conv.dropped == 0 and not code.warnings
    assert code.start == "2023-11-16 18:17:03.9799600"
    assert code.span_s == pytest.approx(3435.9, abs=0.05) and conv.span_s == pytest.approx(3501.7, abs=0.05)
    assert code.mean_rate == pytest.approx(2.57, abs=0.005) and conv.mean_rate == pytest.approx(5.53, abs=0.005)
    assert np.all(np.diff(code.arrival_s) >= 0) and code.arrival_s[0] == 0.0
    assert int(np.median(code.context_tokens)) == 1469 and int(conv.generated_tokens.max()) == 1000
    # 7 fractional digits survive: the second request came 0.052 s after the first
    assert code.arrival_s[1] == pytest.approx(0.052, abs=1e-9)


def test_real_burstgpt_head_drops_failed_requests():
    t = load_named("burstgpt-head")
    assert t.format == "burstgpt" and t.dropped == 17 and len(t) == 400 - 17
    assert t.span_s == 37269.0 and t.start == "5"
    assert any("dropped 17" in w for w in t.warnings)


def test_binning_conserves_requests_and_tokens():
    t = load_named("azure-code")
    for b in (1, 10, 60):
        df = binned(t, b)
        assert df.requests.sum() == len(t)
        assert df.tokens.sum() == (t.context_tokens + t.generated_tokens).sum()
    s = burstiness(t, 10, poisson_trials=50)
    assert s["peak_to_mean_rps"] > s["poisson_peak_to_mean_rps"] > 1  # the code trace is burstier than Poisson


def _write(tmp_path: Path, text: str, name="t.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


GOOD = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.9799600,10,5\r\n2023-11-16 18:17:04.5,3,2"


def test_minimal_files_parse(tmp_path):
    t = load_trace(_write(tmp_path, GOOD))
    assert len(t) == 2 and t.arrival_s.tolist() == pytest.approx([0.0, 0.52004])
    b = load_trace(_write(tmp_path, "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                    "5,ChatGPT,10,2,12,Conversation log\n5,GPT-4,0,0,0,API log\n9,ChatGPT,1,1,3,x\n"))
    assert len(b) == 2 and b.dropped == 1 and b.arrival_s.tolist() == [0.0, 4.0]
    assert any("Total tokens" in w for w in b.warnings)


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("TIME,ContextTokens,GeneratedTokens\n1,2,3\n", "unknown trace format"),
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.1,2\n", "missing column(s) 'GeneratedTokens'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,2\n", "t.csv:2: expected 3 fields, got 2"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n18:17:03.1,2,3\n", "t.csv:2: timestamp '18:17:03.1'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,2,3\n2023-11-16 18:17:02.1,2,3\n",
     "t.csv:3: timestamp 2023-11-16 18:17:02.1 is earlier"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,-2,3\n", "ContextTokens is negative"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,2,x\n", "GeneratedTokens 'x' is not an integer"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,0,3\n", "no requests"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n", "no requests"),
])
def test_malformed_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(MorphError) as exc:
        load_trace(_write(tmp_path, text))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_folder_and_file(tmp_path, monkeypatch):
    with pytest.raises(MorphError, match="trace file not found"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(MorphError, match="traces folder not found"):
        resolve_traces_dir(tmp_path / "absent")
    monkeypatch.setenv("MORPHLIB_TRACES", str(tmp_path))
    assert resolve_traces_dir() == tmp_path.resolve()
    with pytest.raises(MorphError, match=TRACE_FILES["azure-code"]):
        load_named("azure-code")
    with pytest.raises(MorphError, match="unknown trace"):
        load_named("azure-chat")
    assert os.environ["MORPHLIB_TRACES"] == str(tmp_path)


def test_traces_ship_with_the_package(monkeypatch):
    """A clone (or a pip install) stands alone: the default folder is the package's own copy, licences included."""
    monkeypatch.delenv("MORPHLIB_TRACES", raising=False)
    folder = resolve_traces_dir()
    assert folder.parts[-3:] == ("morphlib", "data", "traces")
    for name in (*TRACE_FILES.values(), "README.md", "AzureLLMInferenceTrace_LICENSE.txt", "BurstGPT_LICENSE.txt"):
        assert (folder / name).is_file(), name
