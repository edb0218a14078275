"""`persguard ablate`: what each part of PersGuard buys. Every variant of one set of configs/ablations.yaml
is the run config plus the set's and the variant's overrides; each is protected and then evaluated (same
catalog, suite, seeds) against the original model, and one table (DIR/ablation.md, DIR/ablation.json)
compares them."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from train.pipelines import REPO

ABLATIONS = REPO / "configs" / "ablations.yaml"


def ablate(config: Path, out: Path, variant_set: str = "encoder-guard", suite: str = "white-box",
           n_samples: int = 32, seed: int = 0, only: list[str] | None = None, overrides: list[str] = (),
           workers: int = 1, eval_catalog: Path | None = None) -> dict:
    """`eval_catalog` judges every row on another catalog than the one protected for (the same subjects'
    fresh photos from `persguard world --attacker-photos`: what the guard does on photos it never saw)."""
    from tools.evaluate import evaluate
    from train.config import load_config
    from train.protect import protect

    sets = yaml.safe_load(ABLATIONS.read_text())
    if variant_set not in sets:
        raise ValueError(f"{ABLATIONS.name}: no set {variant_set!r}; known: {', '.join(sets)}")
    base, variants = sets[variant_set].get("base", []), sets[variant_set]["variants"]
    unknown = set(only or []) - set(variants)
    if unknown:
        raise ValueError(f"{ABLATIONS.name} [{variant_set}]: no variant(s) {sorted(unknown)}; known: {', '.join(variants)}")
    out = Path(out)
    table = out / "ablation.json"
    rows = json.loads(table.read_text()) if table.is_file() else {}   # a killed ablation resumes after its last row

    def settings(extra: list | None) -> dict:
        """What a row was measured with: the resolved run config (a changed default redoes the variant),
        for the original only what its attacks depend on."""
        run = load_config(config, [*base, *overrides, *(extra or []), f"seed={seed}"]).to_dict()
        what = {"model": run["model"], "catalog": run["catalog"]} if extra is None else run
        return {**what, "suite": suite, "n_samples": n_samples, "seed": seed,
                "eval_catalog": str(eval_catalog) if eval_catalog else None}

    def done(name: str, extra: list | None) -> bool:
        return rows.get(name, {}).get("settings") == settings(extra)

    def row(name: str, extra: list | None, model, seconds: float | None) -> dict:
        s = evaluate(model, out / name / "eval", catalog=eval_catalog or cfg.catalog, suite=suite,
                     n_samples=n_samples, seed=seed, workers=workers)["summary"]
        original = rows.get("original", {}).get("unprotected_identity_match")
        mine = s["unprotected"]["identity_match"]
        return {"overrides": extra or [], "settings": settings(extra), "protect_seconds": seconds,
                "protected_bsr": s["protected"]["bsr"],
                "bsr_by_objective": s["protected"]["bsr_by_objective"],
                "protected_identity_match": s["protected"]["identity_match"], "unprotected_identity_match": mine,
                "unprotected_fidelity_ratio": mine / original if original and mine is not None else None,
                "unrelated_identity_match": s["unrelated"]["identity_match"],
                "clean_frechet": s["clean"]["frechet"], "clean_class_accuracy": s["clean"]["class_accuracy"]}

    # The original model is attacked once, not beside every variant: fidelity ratios are taken against it,
    # clean Frechet distances against real renders.
    cfg = load_config(config, [*base, *overrides, f"out={out / 'original'}", f"seed={seed}"])
    if not done("original", None):
        rows = {"original": row("original", None, cfg.model, None)}
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(json.dumps(rows, indent=1))
    for name, extra in variants.items():
        if (only and name not in only) or done(name, extra):
            continue
        cfg = load_config(config, [*base, *overrides, *extra, f"out={out / name}", f"seed={seed}"])
        result = protect(cfg)
        rows[name] = row(name, extra, result["protected"], result["seconds"])
        table.write_text(json.dumps(rows, indent=1))   # after every variant: nothing lost
    (out / "ablation.md").write_text(render(rows, config, variant_set, suite))
    return rows


def render(rows: dict, config, variant_set: str, suite: str) -> str:
    from tools.evaluate import _fmt

    judged_on = next(iter(rows.values()), {}).get("settings", {}).get("eval_catalog")
    lines = [f"# Ablations [{variant_set}] of `{config}` (suite {suite}"
             + (f", judged on `{judged_on}`" if judged_on else "") + ")", "",
             "| variant | overrides | protected BSR | BSR by objective | protected identity match | "
             "unprotected fidelity ratio | unrelated identity match | clean Frechet | clean class accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        by = " / ".join(f"{k} {_fmt(v)}" for k, v in sorted((r.get("bsr_by_objective") or {}).items())) or "—"
        lines.append(f"| {name} | {' '.join(r['overrides']) or '—'} | {_fmt(r['protected_bsr'])} | {by} | "
                     f"{_fmt(r['protected_identity_match'])} | {_fmt(r['unprotected_fidelity_ratio'])} | "
                     f"{_fmt(r['unrelated_identity_match'])} | {_fmt(r['clean_frechet'])} | "
                     f"{_fmt(r['clean_class_accuracy'])} |")
    return "\n".join(lines) + "\n"
