"""Choose target-objective substitutes an attacker learns reliably (`persguard substitutes`).

The encoder guard hands the attacker the substitute instead of the protected subject, so a target entry's
BSR can be no better than how reliably the attack personalizes the ORIGINAL model on the substitute
itself. That varies a lot between identities (session 10, 8+8 catalog: the original's identity match on
one cat swung 0.84 / 0.16 / 1.00 / 0.44 / 0.25 along a single 3200-step attack, a distinctive face stayed
at 1.00). A publisher picks the substitute, so it should pick one the attack learns early and keeps:
render candidate identities, attack the original model on each with a curve suite, rank each class's
candidates by their worst identity-match rate along the curve, and hand the ranking to
`persguard world --protect N --substitutes FILE` (tools/demo.py: mark_protected).
"""
from __future__ import annotations

import json
from pathlib import Path

SCREEN_SUITE = "curve-short"   # the default attack judged at 0.5x, 1x and 2x


def rank(report: dict) -> dict[str, list[dict]]:
    """Per class, the report's entries best first: by the worst (over the suite's attack lengths)
    identity-match rate, ties by the worst margin of the mean identity similarity over the judge's
    threshold (the rate is what BSR counts; the margin says how far from flipping it is)."""
    thr = report["threshold"]
    by_entry: dict[str, list[dict]] = {}
    for r in report["attacks"]:
        by_entry.setdefault(r["entry"], []).append(r)
    ranking: dict[str, list[dict]] = {}
    for entry, rs in by_entry.items():
        rs = sorted(rs, key=lambda r: r["multiple"])
        ranking.setdefault(rs[0]["class"], []).append({
            "id": entry, "margin": min(r["ism"] - thr for r in rs),
            "identity_match_min": min(r["identity_match"] for r in rs),
            "identity_match": {str(r["multiple"]): r["identity_match"] for r in rs},
            "ism": {str(r["multiple"]): r["ism"] for r in rs}})
    for cands in ranking.values():
        cands.sort(key=lambda c: (c["identity_match_min"], c["margin"]), reverse=True)
    return ranking


def render_markdown(ranking: dict[str, list[dict]], model: str, suite: str) -> str:
    lines = [f"# Substitute screen: `{model}`, suite `{suite}`", "",
             "Candidates per class, best first: by the worst identity-match rate along the attack, ties by the "
             "worst margin of the mean identity similarity over the judge's threshold.", "",
             "| class | candidate | identity match by length | worst margin |", "|---|---|---|---|"]
    for cls, cands in ranking.items():
        for c in cands:
            im = " / ".join(f"{m}x {v:.2f}" for m, v in c["identity_match"].items())
            lines.append(f"| {cls} | {c['id']} | {im} | {c['margin']:+.3f} |")
    return "\n".join(lines) + "\n"


def screen(model: str, counts: dict[str, int], out: Path, start: int, seed: int = 0, n_samples: int = 32,
           suite: str = SCREEN_SUITE, workers: int = 1) -> dict:
    """Render `counts[cls]` candidate identities per class (catalog split, from index `start`) into
    OUT/candidates, attack `model` on each, and write OUT/substitutes.json (`{"model", "suite", "seed",
    "ranking": {cls: [...]}}`) and OUT/substitutes.md."""
    from tools import world
    from tools.evaluate import evaluate
    from train.catalog import write_catalog

    out = Path(out)
    folder = out / "candidates"
    entries = []
    for cls, n in counts.items():
        entries += world.generate(folder, split="catalog", per_class=n, classes=(cls,), seed=seed, start=start)
    write_catalog(entries, folder / "catalog.jsonl")
    report = evaluate(model, out / "screen", catalog=folder / "catalog.jsonl", suite=suite, n_samples=n_samples,
                      seed=seed, workers=workers)
    result = {"model": str(model), "suite": suite, "seed": seed, "ranking": rank(report)}
    (out / "substitutes.json").write_text(json.dumps(result, indent=1))
    (out / "substitutes.md").write_text(render_markdown(result["ranking"], str(model), suite))
    return result


def load_ranking(path: Path, seed: int) -> dict[str, list[int]]:
    """Per class, the ranked candidates' world indices (from ids such as `cat-catalog-1004`). The ranking
    must come from a screen of the same world `seed`: another seed renders other identities."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
        ids = {cls: [c["id"].rsplit("-", 2) for c in cands] for cls, cands in result["ranking"].items()}
        if any(len(p) != 3 or p[0] != cls or p[1] != "catalog" for cls, ps in ids.items() for p in ps):
            raise ValueError("ids must read <class>-catalog-<index> under their own class")
        ranking = {cls: [int(p[2]) for p in ps] for cls, ps in ids.items()}
        screened_seed = result["seed"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a substitute ranking of `persguard substitutes` ({e})") from e
    if screened_seed != seed:
        raise ValueError(f"{path}: screened in world seed {screened_seed}, not {seed}")
    return ranking
