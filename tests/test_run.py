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
    assert "morphbook/experiments/burst.py::run" in summary["provenance"]["fingerprint"]
    # the same run again reproduces every detail file: re-verified, not a new result
    again = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "cpu", "--results", str(tmp_path),
                            "--one", "burst"], capture_output=True, text=True, timeout=300)  # in one process
    assert again.returncode == 0 and "re-verified at " in again.stdout, again.stdout + again.stderr
    prov = json.loads((tmp_path / "burst" / "summary.json").read_text())["provenance"]
    assert prov["date"] == summary["provenance"]["date"] and len(prov["reverified"]) == 1
    bad = subprocess.run([sys.executable, "-m", "morphbook.run", "--only", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown experiment" in bad.stderr and "Traceback" not in bad.stderr
    # chapter 3's gpu profile on a machine without CUDA: a one-line error, reported, exit 1
    gpu = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "gpu", "--results", str(tmp_path),
                          "--only", "transfer"], capture_output=True, text=True, timeout=300)
    if gpu.returncode != 0:  # (on a GPU machine it simply runs)
        assert "[transfer] error:" in gpu.stdout and "Traceback" not in gpu.stdout + gpu.stderr


def test_set_overrides_a_config_field_and_rejects_bad_input(tmp_path):
    from morphbook.run import parse_overrides

    assert parse_overrides(["model=gemma3-270m", "ks=[2, 4]", "n_boot=10"]) == {
        "model": "gemma3-270m", "ks": [2, 4], "n_boot": 10}
    out = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "cpu", "--results", str(tmp_path),
                          "--only", "burst", "--set", "window_s=36", "--set", "swap_counts=[0, 8]"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    params = json.loads((tmp_path / "burst" / "summary.json").read_text())["provenance"]["params"]
    assert params["window_s"] == 36 and list(params["swap_counts"]) == [0, 8]
    bad = subprocess.run([sys.executable, "-m", "morphbook.run", "--set", "model"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "cpu", "--results", str(tmp_path),
                              "--only", "burst", "--set", "no_such_field=1"], capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 1 and "[burst] error:" in unknown.stdout
    assert "Traceback" not in unknown.stdout + unknown.stderr
