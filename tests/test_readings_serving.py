"""Chapter 5's serving readings, each on both sides of its condition."""

from types import SimpleNamespace

from morphbook.publish.readings import serving as _serving
from test_readings import said  # sentences with plain spaces, as the tests write them


def _plain(f):
    return lambda *args, **kwargs: said(f, *args, **kwargs)


serving = SimpleNamespace(**{name: _plain(getattr(_serving, name)) for name in (
    "replays_sentence", "effect_sentence", "ablation_sentence", "simulator_sentence", "verdict_sentence", "leads_sentence")})

HEAD = {"engine_replays": 0, "engine_replays_registered": 48, "engine_replays_stale": 0,
        "simulator_validated_replays": 0, "verdict": {"state": "not yet tested", "setting": "llama7b-l4", "windows": {}}}


def cell(policy, viol, red=None, ci=None, p95=1.0, spd=None, spd_ci=None, replays=1):
    c = {"setting": "s", "window": "azure-conv-busiest", "policy": policy, "slo_violation_pct": viol, "p95_ttft_s": p95,
         "replays": replays}
    if red is not None:
        c.update(slo_violation_reduction_vs_fp16=red, slo_violation_reduction_vs_fp16_ci95=ci,
                 p95_ttft_speedup_vs_fp16=spd, p95_ttft_speedup_vs_fp16_ci95=spd_ci)
    return c


def test_replays_sentence_with_none_and_some():
    none = serving.replays_sentence(HEAD, [{"slice": "llama7b-l4.calibrate"}])
    assert "No engine replay has been made yet" in none and "48 are registered" in none and "llama7b-l4.calibrate" in none
    some = serving.replays_sentence({**HEAD, "engine_replays": 5, "engine_replays_stale": 2}, [])
    assert "5 engine replays" in some and "2 stale replays left out" in some and "still to run" not in some


def test_effect_lowers_raises_or_within_noise():
    base = cell("fp16-static", 40.0, p95=4.0, replays=3)
    good = serving.effect_sentence("azure-conv-busiest", {"fp16-static": base, "morph-middle": cell(
        "morph-middle", 10.0, 75.0, [60.0, 90.0], 1.0, 4.0, [3.0, 5.0], 3)}, {"morph-middle": "morphing"})
    assert "morphing lowers" in good and "−75.0 %, 95 % CI −90.0 to −60.0 %" in good and "3 replays each" in good
    bad = serving.effect_sentence("azure-conv-busiest", {"fp16-static": base, "morph-middle": cell(
        "morph-middle", 60.0, -50.0, [-80.0, -10.0], 5.0, 0.8, [0.7, 0.9])}, {})
    assert "raises" in bad and "3 and 1 replay" in bad
    noise = serving.effect_sentence("azure-conv-busiest", {"fp16-static": base, "morph-middle": cell(
        "morph-middle", 35.0, 12.0, [-5.0, 30.0], 3.5, 1.1, [0.9, 1.3])}, {})
    assert "does not clearly change" in noise
    assert _serving.effect_sentence("azure-conv-busiest", {"fp16-static": base}, {}) is None


def test_ablation_attributes_the_effect_only_when_the_intervals_say_so():
    base = cell("fp16-static", 40.0)
    capacity = {"fp16-static": base, "growth-fp16-oracle": cell("growth-fp16-oracle", 10.0, 75.0, [50.0, 90.0]),
                "int4-no-growth": cell("int4-no-growth", 45.0, -12.0, [-30.0, 5.0])}
    assert "comes from the freed KV capacity" in serving.ablation_sentence("azure-conv-busiest", capacity)
    both = {**capacity, "int4-no-growth": cell("int4-no-growth", 30.0, 25.0, [5.0, 40.0])}
    assert "both the freed capacity and INT4 compute" in serving.ablation_sentence("azure-conv-busiest", both)
    costly = {**capacity, "growth-fp16-oracle": cell("growth-fp16-oracle", 38.0, 5.0, [-10.0, 20.0]),
              "int4-no-growth": cell("int4-no-growth", 60.0, -50.0, [-70.0, -30.0])}
    assert "INT4 compute costs more" in serving.ablation_sentence("azure-conv-busiest", costly)
    unclear = {**costly, "int4-no-growth": cell("int4-no-growth", 41.0, -2.0, [-9.0, 6.0])}
    text = serving.ablation_sentence("azure-conv-busiest", unclear)
    assert text.endswith(").") and "comes from" not in text and "costs more" not in text
    assert _serving.ablation_sentence("azure-conv-busiest", {"fp16-static": base}) is None


def test_simulator_and_verdict_sentences():
    assert "no engine replay" in serving.simulator_sentence(HEAD, {"ttft_pct": 10, "tpot_pct": 10, "slo_pts": 3})
    val = {**HEAD, "simulator_validated_replays": 4, "simulator_ttft_p95_error_pct": 6.0, "simulator_tpot_error_pct": 3.0,
           "simulator_slo_rate_error_pts": 1.5, "simulator_within_bounds": True, "engine_repeat_spread_pct": 4.0}
    assert "within every bound" in serving.simulator_sentence(val, {"ttft_pct": 10, "tpot_pct": 10, "slo_pts": 3})
    out = serving.simulator_sentence({**val, "simulator_within_bounds": False}, {"ttft_pct": 10, "tpot_pct": 10, "slo_pts": 3})
    assert "outside at least one bound" in out and "spread of P95 TTFT reaches 4.0" in out
    assert "**not yet tested**" in serving.verdict_sentence(HEAD)
    held = serving.verdict_sentence({"verdict": {"state": "holds in part", "setting": "x", "windows": {
        "azure-code-busiest": {"reduction_ci95_low": 20.0, "speedup_ci95_low": 1.2}}}})
    assert "**holds in part**" in held and "busiest code window: reduction ≥ 20.0" in held


def test_leads_sentence():
    assert "not measured" in serving.leads_sentence([])
    rows = [{"policy": "predictive-middle", "lead_s": 1.5}, {"policy": "predictive-middle", "lead_s": None},
            {"policy": "morph-middle", "lead_s": -0.2}]
    text = serving.leads_sentence(rows)
    assert "2 surges" in text and "1.50 s before" in text and "missed 1 surge" in text and "reactive one −0.20 s" in text
