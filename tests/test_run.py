"""python -m morphbook.run: experiments without notebooks, one fresh process each, results with provenance."""

import json
import subprocess
import sys


def test_run_writes_results_and_reports_failures(tmp_path):
    out = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "cpu", "--results", str(tmp_path),
                          "--only", "burst"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "burst" / "summary.json").read_text())
    assert summary["provenance"]["profile"] == "cpu" and summary["provenance"]["wall_s"] >= 0
    assert set(summary["provenance"]["files"]) >= {"capacity.json", "traces.json"}
    bad = subprocess.run([sys.executable, "-m", "morphbook.run", "--only", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown experiment" in bad.stderr and "Traceback" not in bad.stderr
    # chapter 3's gpu profile on a machine without CUDA: a one-line error, reported, exit 1
    gpu = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "gpu", "--results", str(tmp_path),
                          "--only", "transfer"], capture_output=True, text=True, timeout=300)
    if gpu.returncode != 0:  # (on a GPU machine it simply runs)
        assert "[transfer] error:" in gpu.stdout and "Traceback" not in gpu.stdout + gpu.stderr
