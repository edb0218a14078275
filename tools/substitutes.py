"""Choose target-objective substitutes an attacker learns reliably (`persguard substitutes`).

The encoder guard hands the attacker the substitute instead of the protected subject, so a target entry's
BSR can be no better than how reliably the attack personalizes the ORIGINAL model on the substitute
itself. That varies a lot between identities (session 10, 8+8 catalog: the original's identity match on
one cat swung 0.84 / 0.16 / 1.00 / 0.44 / 0.25 along a single 3200-step attack, a distinctive face stayed
at 1.00). A publisher picks the substitute, so it should pick one the attack learns early and keeps:
render candidate identities, attack the original model on each with a curve suite (`draws` times: one
draw is noisy), rank each class's candidates by their worst mean identity-match rate along the curve,
and hand the ranking to `persguard world --protect N --substitutes FILE` (tools/demo.py: mark_protected).
"""
from __future__ import annotations

import json
from pathlib import Path

SCREEN_SUITE = "curve-short"   # the default attack judged at 0.5x, 1x and 2x
WEAK_BELOW = 0.95   # the PersGuard issue's BSR bar at 1x: a substitute learned less often cannot meet it


def rank(*reports: dict) -> dict[str, list[dict]]:
    """Per class, the reports' entries best first: by the worst (over the suite's attack lengths) mean
    identity-match rate over the reports (attack draws), ties by the worst mean margin of the identity
    similarity over the judge's threshold (the rate is what BSR counts; the margin says how far from
    flipping it is). One draw is not enough to rank on (session 12: the same cat's own photos gave 0.53
    to 1.00 at 1x across draws); `draws` records how many each mean is over."""
    cells: dict[str, dict[float, list[tuple[float, float]]]] = {}
    classes: dict[str, str] = {}
    for report in reports:
        thr = report["threshold"]
        for r in report["attacks"]:
            cells.setdefault(r["entry"], {}).setdefault(r["multiple"], []).append((r["identity_match"], r["ism"] - thr))
            classes[r["entry"]] = r["class"]
    ranking: dict[str, list[dict]] = {}
    for entry, by_multiple in cells.items():
        mean = {m: (sum(v[0] for v in vs) / len(vs), sum(v[1] for v in vs) / len(vs))
                for m, vs in sorted(by_multiple.items())}
        ranking.setdefault(classes[entry], []).append({
            "id": entry, "margin": min(v[1] for v in mean.values()),
            "identity_match_min": min(v[0] for v in mean.values()),
            "identity_match": {str(m): v[0] for m, v in mean.items()},
            "draws": min(len(vs) for vs in by_multiple.values())})
    for cands in ranking.values():
        cands.sort(key=lambda c: (c["identity_match_min"], c["margin"]), reverse=True)
    return ranking


def render_markdown(ranking: dict[str, list[dict]], model: str, suite: str, draws: int = 1,
                    row_label: str = "class") -> str:
    lines = [f"# Substitute screen: `{model}`, suite `{suite}`, {draws} attack draw(s)", "",
             f"Candidates per {row_label}, best first: by the worst identity-match rate along the attack (mean "
             "over the draws), ties by the worst margin of the mean identity similarity over the judge's threshold.",
             "", f"| {row_label} | candidate | identity match by length | worst margin |", "|---|---|---|---|"]
    for cls, cands in ranking.items():
        for c in cands:
            im = " / ".join(f"{m}x {v:.2f}" for m, v in c["identity_match"].items())
            lines.append(f"| {cls} | {c['id']} | {im} | {c['margin']:+.3f} |")
    return "\n".join(lines) + "\n"


def screen(model: str, counts: dict[str, int], out: Path, start: int, seed: int = 0, n_samples: int = 32,
           suite: str = SCREEN_SUITE, workers: int = 1, draws: int = 1) -> dict:
    """Render `counts[cls]` candidate identities per class (catalog split, from index `start`) into
    OUT/candidates, attack `model` on each `draws` times (evaluation seeds `seed`, `seed` + 1, ...; the
    first is OUT/screen, the others OUT/screen-<k>), and write OUT/substitutes.json (`{"model", "suite",
    "seed", "draws", "ranking": {cls: [...]}}`) and OUT/substitutes.md."""
    from tools import world
    from tools.evaluate import evaluate
    from train.catalog import write_catalog

    if draws < 1:
        raise ValueError(f"substitutes: draws must be >= 1, not {draws}")
    out = Path(out)
    folder = out / "candidates"
    entries = []
    for cls, n in counts.items():
        entries += world.generate(folder, split="catalog", per_class=n, classes=(cls,), seed=seed, start=start)
    write_catalog(entries, folder / "catalog.jsonl")
    reports = [evaluate(model, out / ("screen" if k == 0 else f"screen-{k}"), catalog=folder / "catalog.jsonl",
                        suite=suite, n_samples=n_samples, seed=seed + k, workers=workers) for k in range(draws)]
    result = {"model": str(model), "suite": suite, "seed": seed, "draws": draws, "ranking": rank(*reports)}
    (out / "substitutes.json").write_text(json.dumps(result, indent=1))
    (out / "substitutes.md").write_text(render_markdown(result["ranking"], str(model), suite, draws))
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


def save_images(images, folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def transplanted(e, images, backgrounds, subs, sub_backgrounds, catalog: Path):
    """The encoder guard's exact target for entry `e`'s photos: the substitute moved onto each of them."""
    from train import encoder_guard

    moved = encoder_guard.transplant(encoder_guard.subject_masks(images, backgrounds), backgrounds, subs,
                                     encoder_guard.subject_masks(subs, sub_backgrounds))
    if moved is None:
        raise ValueError(f"{catalog}: line {e.line} ({e.id}): an empty subject mask, nothing to transplant")
    return moved[0]


def judged(entry_id: str, cls: str, images, folder: Path, reference: Path) -> dict:
    """An unprotected entry of `images` (saved to `folder`) judged against `reference`'s held-out views."""
    return {"id": entry_id, "class": cls, "protected": False, "objective": None, "target": None,
            "images": str(save_images(images, folder).resolve()), "reference": str(Path(reference).resolve())}


def portable(e) -> dict:
    """Catalog entry `e` as a row that reads the same from any folder (absolute paths)."""
    row = e.to_json()
    row.update({k: str(Path(getattr(e, k)).resolve()) for k in ("images", "reference", "backgrounds") if getattr(e, k)})
    if e.target:
        row["target"] = {k: str((e.catalog_dir / v).resolve()) for k, v in e.target.items()}
    return row


def _candidate(cand: str, folder: Path, seed: int) -> dict:
    """Render candidate `<class>-catalog-<index>` of world `seed` into `folder`; its world row."""
    from tools import world

    parts = cand.rsplit("-", 2)
    if len(parts) != 3 or parts[1] != "catalog" or not parts[2].isdigit() or parts[0] not in world.CLASSES:
        raise ValueError(f"candidate {cand!r}: expected <class>-catalog-<index> of a world class "
                         f"({', '.join(world.CLASSES)})")
    return world.generate(folder, split="catalog", per_class=1, classes=(parts[0],), seed=seed,
                          start=int(parts[2]), progress=False)[0]


def candidate_rows(catalog: Path, e, candidates: list[str], out: Path, seed: int = 0) -> list[dict]:
    """Each candidate substitute (any class: SPEC allows "a rabbit instead of the dog"), rendered into
    OUT/world, moved onto protected entry `e`'s photos exactly as the guard would, as an unprotected entry
    of `e`'s class (the attacker's prompt names it) judged against the candidate's held-out views. The
    original model attacked on them ranks the candidates for this entry, a perfect guard assumed: how well
    a substitute is learned depends on the photos it is moved onto (session 14: one vase 0.44 with the cat
    that gave another vase 1.00)."""
    from train.catalog import load_images

    if e.backgrounds is None:
        raise ValueError(f"{catalog}: line {e.line} ({e.id}): a transplant needs the entry's backgrounds")
    images, backgrounds, rows = load_images(e.images, 64), load_images(e.backgrounds, 64), []
    for cand in candidates:
        sub = _candidate(cand, out / "world", seed)
        moved = transplanted(e, images, backgrounds, load_images(out / "world" / sub["images"], 64),
                             load_images(out / "world" / sub["backgrounds"], 64), catalog)
        rows.append(judged(f"{e.id}-as-{cand}", e.cls, moved, out / f"{e.id}-as-{cand}", out / "world" / sub["reference"]))
    return rows


def assign(catalog: Path, candidates: list[str], out: Path, model: str = "tiny-sd", seed: int = 0,
           n_samples: int = 32, suite: str = SCREEN_SUITE, workers: int = 1, draws: int = 1,
           only: list[str] | None = None) -> dict:
    """Screen `candidates` for every target entry of `catalog` (or those of ids `only`: the ones a ceiling
    evaluation found weak) on that entry's own photos (candidate_rows) and write OUT/catalog.jsonl: the
    catalog with each screened entry's substitute its best-ranked candidate (other entries as they were;
    absolute paths), OUT/substitutes.json (`{"model", "suite", "seed",
    "draws", "catalog", "per_entry": {entry: [ranked candidates]}, "weak": [entries whose best candidate
    stays below WEAK_BELOW]}`) and OUT/substitutes.md."""
    from tools.evaluate import evaluate
    from train.catalog import load_catalog, write_catalog

    if draws < 1:
        raise ValueError(f"substitutes: draws must be >= 1, not {draws}")
    if not candidates or len(set(candidates)) != len(candidates):
        raise ValueError(f"substitutes: candidates must be distinct and not empty, got {candidates}")
    out, entries = Path(out), load_catalog(catalog)
    targets = [e for e in entries if e.objective == "target" and (only is None or e.id in only)]
    missing = set(only or ()) - {e.id for e in targets}
    if missing:
        raise ValueError(f"{catalog}: no target entry {', '.join(sorted(missing))}")
    if not targets:
        raise ValueError(f"{catalog}: no target entry to choose a substitute for")
    rows, pair = [], {}
    for e in targets:
        for cand, row in zip(candidates, candidate_rows(catalog, e, candidates, out, seed)):
            rows.append(row)
            pair[row["id"]] = (e.id, cand)
    write_catalog(rows, out / "candidates.jsonl")
    reports = [evaluate(model, out / ("screen" if k == 0 else f"screen-{k}"), catalog=out / "candidates.jsonl",
                        suite=suite, n_samples=n_samples, seed=seed + k, workers=workers) for k in range(draws)]
    per_entry: dict[str, list[dict]] = {e.id: [] for e in targets}
    for cands in rank(*reports).values():   # per class, best first; an entry's rows all share its class
        for c in cands:
            entry, cand = pair[c["id"]]
            per_entry[entry].append({**c, "id": cand})
    assigned = []
    for e in entries:
        row = portable(e)
        if e.id in per_entry:
            sub = _candidate(per_entry[e.id][0]["id"], out / "world", seed)
            row["target"] = {k: str((out / "world" / sub[k]).resolve()) for k in ("images", "backgrounds", "reference")}
        assigned.append(row)
    write_catalog(assigned, out / "catalog.jsonl")
    weak = sorted(e for e, cands in per_entry.items() if cands[0]["identity_match_min"] < WEAK_BELOW)
    result = {"model": str(model), "suite": suite, "seed": seed, "draws": draws, "catalog": str(catalog),
              "per_entry": per_entry, "weak": weak}
    (out / "substitutes.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(per_entry, str(model), suite, draws, row_label="entry")
    if weak:
        md += (f"\nNo candidate reached {WEAK_BELOW} for {', '.join(weak)}: screen more candidates, or protect "
               "these entries with the pattern or erasure objective, which do not depend on a substitute.\n")
    (out / "substitutes.md").write_text(md)
    return result
