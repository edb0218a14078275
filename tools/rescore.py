"""`persguard rescore RUN --evaluators DIR --out OUT`: re-judge a finished `persguard evaluate` run with other
evaluator networks, from the samples its PNG grids keep, without re-running one attack.

A grid holds the entry's reference photos (rows of 8) and then the attack's samples, as 8-bit pixels: the
rescored metrics are those of the samples rounded to 8 bits (rescoring with the run's own evaluators gives
its numbers back, up to a sample that sat on a threshold). The attack records, the protected / unprotected /
unrelated summary and the curve are re-judged; the clean-generation and class-prompt numbers keep the
run's values (their samples are not kept) and `rescored.not_rescored` says so.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools.evaluate import _curve, attack_summary, render_markdown
from tools.score import evaluators, score, use_evaluators
from train.catalog import list_images, load_catalog

PER_ROW, SIZE = 8, 64
SCORE_KEYS = ("ism", "identity_match", "subject_detect", "pattern_similarity", "target_match", "bsr")


def grid_samples(path: Path, n_references: int, n: int) -> torch.Tensor:
    """The `n` samples of an evaluation grid (tools.evaluate.save_grid), as (n, 3, 64, 64) in [0, 1]."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    first = math.ceil(n_references / PER_ROW) * SIZE
    rows = grid[first:].reshape(-1, SIZE, PER_ROW, SIZE, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, SIZE, SIZE)
    if len(rows) < n:
        raise ValueError(f"{path}: holds {len(rows)} sample tiles after {n_references} references, the record says {n}")
    return torch.from_numpy(rows[:n].copy()).float() / 255.0


def _slot(record: dict) -> int:
    return int(Path(record["grid"]).name.split("__")[2].split("-")[0])


def rescore(run: Path, evaluators_dir: Path, out: Path) -> dict:
    run, out = Path(run), Path(out)
    report_path = run / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path}: no evaluation report (the folder of a `persguard evaluate --out`)")
    report = json.loads(report_path.read_text())
    catalog = Path(report["catalog"])
    if not catalog.is_file():
        raise FileNotFoundError(f"{report_path}: its catalog {catalog} is not here (run from where it was evaluated)")
    entries = {e.id: e for e in load_catalog(catalog)}
    use_evaluators(evaluators_dir)
    out.mkdir(parents=True, exist_ok=True)

    samples = {}

    def rejudge(records: list[dict], keep: bool) -> list[dict]:
        new = []
        for r in records:
            if not r.get("grid"):
                raise ValueError(f"{report_path}: attack {r['entry']} / {r.get('attack')} kept no grid to rescore")
            entry = entries[r["entry"]]
            images = grid_samples(run / r["grid"], len(list_images(entry.reference_dir)), r["n"])
            if keep and r.get("multiple", 1) == 1:
                samples[entry.id, _slot(r)] = images
            new.append({**r, **score(images, entry), "grid": os.path.relpath(run / r["grid"], out),
                        "before_rescore": {k: r.get(k) for k in SCORE_KEYS}})
        return new

    attacks = rejudge(report["attacks"], keep=True)
    base = rejudge(report["baseline_attacks"], keep=False) if report.get("baseline_attacks") else None
    at_length = [r for r in attacks if r.get("multiple", 1) == 1]
    base_at_length = [r for r in base if r.get("multiple", 1) == 1] if base else None
    n_attacks = 1 + max(slot for _, slot in samples)
    summary = {**report["summary"],
               **attack_summary(at_length, base_at_length, list(entries.values()), samples, n_attacks)}
    if report["summary"].get("curve"):
        summary["curve"] = _curve(attacks, base, sorted({r["multiple"] for r in attacks}))
    report.update(attacks=attacks, baseline_attacks=base, summary=summary, threshold=evaluators().threshold,
                  rescored={"from": str(run), "evaluators": str(evaluators_dir),
                            "threshold_before": report["threshold"],
                            "not_rescored": ["class_prompt", "clean"]})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report).replace(
        "\n\n", f"\n\nRe-judged from `{run}`'s grids with the evaluators in `{evaluators_dir}` (threshold "
        f"{report['rescored']['threshold_before']:.3f} before); clean generation and the class prompt keep the "
        "run's numbers.\n\n", 1))
    return report
