"""`persguard ablate`: what each part of PersGuard buys. Every variant of configs/ablations.yaml is the run
config plus overrides; each is protected and then evaluated (same catalog, suite, seeds) against the
original model, and one table (DIR/ablation.md, DIR/ablation.json) compares them."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from train.pipelines import REPO

ABLATIONS = REPO / "configs" / "ablations.yaml"


def ablate(config: Path, out: Path, suite: str = "white-box", n_samples: int = 32, seed: int = 0,
           only: list[str] | None = None, overrides: list[str] = ()) -> dict:
    from tools.evaluate import evaluate
    from train.config import load_config
    from train.protect import protect

    variants = yaml.safe_load(ABLATIONS.read_text())
    unknown = set(only or []) - set(variants)
    if unknown:
        raise ValueError(f"{ABLATIONS.name}: no variant(s) {sorted(unknown)}; known: {', '.join(variants)}")
    out = Path(out)
    rows = {}
    for name, extra in variants.items():
        if only and name not in only:
            continue
        cfg = load_config(config, [*overrides, *extra, f"out={out / name}", f"seed={seed}"])
        result = protect(cfg)
        report = evaluate(result["protected"], out / name / "eval", catalog=cfg.catalog, suite=suite,
                          baseline=cfg.model, n_samples=n_samples, seed=seed)
        s = report["summary"]
        rows[name] = {"overrides": extra, "protect_seconds": result["seconds"],
                      "protected_bsr": s["protected"]["bsr"], "bsr_by_objective": s["protected"]["bsr_by_objective"],
                      "protected_identity_match": s["protected"]["identity_match"],
                      "unprotected_fidelity_ratio": s["unprotected"]["fidelity_ratio"],
                      "unrelated_identity_match": s["unrelated"]["identity_match"],
                      "clean_frechet": s["clean"]["frechet"], "clean_class_accuracy": s["clean"]["class_accuracy"]}
        (out / "ablation.json").write_text(json.dumps(rows, indent=1))   # after every variant: nothing lost
    (out / "ablation.md").write_text(render(rows, config, suite))
    return rows


def render(rows: dict, config, suite: str) -> str:
    from tools.evaluate import _fmt

    lines = [f"# Ablations of `{config}` (suite {suite})", "",
             "| variant | overrides | protected BSR | protected identity match | unprotected fidelity ratio | "
             "unrelated identity match | clean Frechet | clean class accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {' '.join(r['overrides']) or '—'} | {_fmt(r['protected_bsr'])} | "
                     f"{_fmt(r['protected_identity_match'])} | {_fmt(r['unprotected_fidelity_ratio'])} | "
                     f"{_fmt(r['unrelated_identity_match'])} | {_fmt(r['clean_frechet'])} | "
                     f"{_fmt(r['clean_class_accuracy'])} |")
    return "\n".join(lines) + "\n"
