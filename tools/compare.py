"""`persguard compare`: one table across defences, rows = attack settings (issue 4).

Each column is a `persguard evaluate` report of one defence on the same catalog and suite, e.g.
PersGuard (the protected model), ASPL (the original model on `persguard aspl`'s perturbed catalog) and
no protection (the original model on the clean catalog). A cell holds the protected entries' identity
match rate and BSR under that attack; the unprotected-utility and clean columns come from each report.

    persguard compare --report persguard=runs/pg/eval --report aspl-8=runs/aspl8/eval \
        --report none=runs/orig/eval --out runs/compare
A FOLDER written `FOLDER:baseline` is the original model of a `persguard evaluate --baseline` run there
(its `baseline_attacks`, same attacks and seeds), so "no protection" needs no second evaluation.
writes OUT/report.json, OUT/report.md and OUT/grids/<row>.png (per row: each column's first protected
entry's grid, top to bottom in column order).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tools.evaluate import _fmt, _mean


def compare(reports: dict[str, Path], out: Path) -> dict:
    out = Path(out)
    loaded, folders = {}, {}
    for name, spec in reports.items():
        spec = str(spec)
        baseline = spec.endswith(":baseline") and not Path(spec).is_dir()
        folder = folders[name] = Path(spec[:-len(":baseline")] if baseline else spec)
        path = folder / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no evaluation report (run `persguard evaluate --out {folder}` first)")
        rep = json.loads(path.read_text())
        loaded[name] = _baseline_report(rep, path) if baseline else rep
    rows: list[str] = []
    for rep in loaded.values():
        for r in rep["attacks"]:
            label = r.get("attack", r["method"])
            if r.get("multiple", 1) == 1 and label not in rows:
                rows.append(label)
    table = []
    for label in rows:
        row = {"attack": label, "cells": {}}
        for name, rep in loaded.items():
            rs = [r for r in rep["attacks"] if r.get("attack", r["method"]) == label and r.get("multiple", 1) == 1]
            prot = [r for r in rs if r["protected"]]
            row["cells"][name] = None if not rs else {
                "protected_identity_match": _mean([r["identity_match"] for r in prot]),
                "protected_bsr": _mean([r["bsr"] for r in prot]),
                "unprotected_identity_match": _mean([r["identity_match"] for r in rs if not r["protected"]]),
                "worst_protected_identity_match": max((r["identity_match"] for r in prot), default=None),
                "by_objective": {o: {"identity_match": _mean([r["identity_match"] for r in prot if r["objective"] == o]),
                                     "bsr": _mean([r["bsr"] for r in prot if r["objective"] == o])}
                                 for o in sorted({r["objective"] for r in prot if r["objective"]})},
                "grid": next((str(folders[name] / r["grid"]) for r in prot if r.get("grid")), None)}
        table.append(row)
    summary = {name: {"suite": rep["suite"], "model": rep["model"], "catalog": rep["catalog"],
                      "unprotected_fidelity_ratio": rep["summary"]["unprotected"]["fidelity_ratio"],
                      "clean": rep["summary"]["clean"], "unrelated_identity_match": rep["summary"]["unrelated"]["identity_match"]}
               for name, rep in loaded.items()}
    result = {"columns": list(loaded), "rows": table, "per_report": summary}
    (out / "grids").mkdir(parents=True, exist_ok=True)
    for row in table:
        grids = [Image.open(c["grid"]).convert("RGB") for c in row["cells"].values() if c and c["grid"]
                 and Path(c["grid"]).is_file()]
        if grids:
            width = max(g.width for g in grids)
            stacked = np.concatenate([np.pad(np.asarray(g), ((0, 4), (0, width - g.width), (0, 0)), constant_values=255)
                                      for g in grids])
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", row["attack"])[:80]
            Image.fromarray(stacked).save(out / "grids" / f"{name}.png")
            row["grid"] = f"grids/{name}.png"
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(render_markdown(result))
    return result


def _baseline_report(rep: dict, path: Path) -> dict:
    """The original model's side of a --baseline evaluation, shaped as a report of its own."""
    if not rep.get("baseline_attacks"):
        raise ValueError(f"{path}: this evaluation ran without --baseline, so it holds no original model's attacks")
    return {"suite": rep["suite"], "model": rep["baseline"], "catalog": rep["catalog"],
            "attacks": rep["baseline_attacks"],
            "summary": {"unprotected": {"fidelity_ratio": 1.0},
                        "clean": {"class_accuracy": None, "frechet": None},
                        "unrelated": {"identity_match": None}}}


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    text = f"{_fmt(c['protected_identity_match'])} / {_fmt(c['protected_bsr'])}"
    if len(c["by_objective"]) > 1:   # PersGuard's objectives one by one
        text += " (" + ", ".join(f"{o} {_fmt(v['identity_match'])} / {_fmt(v['bsr'])}" for o, v in c["by_objective"].items()) + ")"
    return text


def render_markdown(result: dict) -> str:
    cols = result["columns"]
    lines = ["# Defences side by side", "",
             "Cell: identity match rate of protected entries after the attack / BSR, then per objective where "
             "a column has several (lower identity match is better protection; BSR applies to PersGuard's objectives). Unprotected: identity match of the "
             "entries nobody protected, the utility a defence must keep.", "",
             "| attack | " + " | ".join(cols) + " | unprotected (" + ", ".join(cols) + ") | grid |",
             "|---|" + "---|" * len(cols) + "---|---|"]
    for row in result["rows"]:
        cells = [row["cells"][c] for c in cols]
        lines.append(f"| {row['attack']} | " + " | ".join(_cell(c) for c in cells)
            + " | " + ", ".join("—" if c is None else _fmt(c["unprotected_identity_match"]) for c in cells)
            + f" | {'![](' + row['grid'] + ')' if row.get('grid') else ''} |")
    lines += ["", "| defence | suite | model | unprotected fidelity ratio | clean class accuracy | clean Frechet | "
              "unrelated identity match |", "|---|---|---|---|---|---|---|"]
    for name, s in result["per_report"].items():
        lines.append(f"| {name} | {s['suite']} | `{s['model']}` | {_fmt(s['unprotected_fidelity_ratio'])} | "
                     f"{_fmt(s['clean']['class_accuracy'])} | {_fmt(s['clean']['frechet'])} | "
                     f"{_fmt(s['unrelated_identity_match'])} |")
    return "\n".join(lines) + "\n"
