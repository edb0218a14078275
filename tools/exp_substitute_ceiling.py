"""How well can any encoder guard do on the target objective? (session-12 experiment, issue 7)

The guard makes the attacker train on the substitute moved onto each protected photo. A PERFECT guard
would hand the attack exactly those images, so the original model attacked on them is the guard's
ceiling; the original attacked on the substitute's own photos is the ceiling of any guard that hands the
attacker the substitute. For the target entries of a catalog this writes OUT/targets.jsonl (those entries,
for the guarded model), OUT/transplant.jsonl (train/encoder_guard.py: transplant, exactly what the guard
trains towards) and OUT/own.jsonl (the substitute's own photos): unprotected entries judged against the
substitute's held-out views, in the same order, so an evaluation with one seed gives entry k the same
attack and sampling seeds in all three (tools/evaluate.py seeds by position). Then, for each FILE:

    python -m tools.exp_substitute_ceiling runs/wb/world/catalog.jsonl runs/ceiling
    python -m tools.exp_substitute_ceiling CATALOG OUT --entry ID --candidates IDS   (candidates.jsonl)
    persguard evaluate --model tiny-sd --catalog runs/ceiling/FILE --suite curve-short --seed S --out ...
    (targets.jsonl with --model runs/wb/protected)
"""
from pathlib import Path

import numpy as np
from PIL import Image

from train import encoder_guard, objectives
from train.catalog import load_catalog, load_images, write_catalog


def _save(images, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _transplanted(e, images, backgrounds, subs, sub_backgrounds, catalog: Path):
    """The guard's exact target for entry `e`'s photos: the substitute moved onto each of them."""
    moved = encoder_guard.transplant(encoder_guard.subject_masks(images, backgrounds), backgrounds, subs,
                                     encoder_guard.subject_masks(subs, sub_backgrounds))
    if moved is None:
        raise ValueError(f"{catalog}: line {e.line} ({e.id}): an empty subject mask, nothing to transplant")
    return moved[0]


def _judged(entry_id: str, cls: str, images, folder: Path, reference: Path) -> dict:
    """An unprotected entry of `images` (saved to `folder`) judged against `reference`'s held-out views."""
    return {"id": entry_id, "class": cls, "protected": False, "objective": None, "target": None,
            "images": str(_save(images, folder).resolve()), "reference": str(Path(reference).resolve())}


def ceiling_catalogs(catalog: Path, out: Path) -> dict[str, Path]:
    targets, variants = [], {"transplant": [], "own": []}
    for e in load_catalog(catalog):
        if e.objective != "target":
            continue
        target = objectives.resolve(e)
        if e.backgrounds is None or target.images is None or target.backgrounds is None or not e.target.get("reference"):
            raise ValueError(f"{catalog}: line {e.line} ({e.id}): a transplant needs the entry's backgrounds and the "
                             "substitute's images, backgrounds and reference")
        moved = _transplanted(e, load_images(e.images, 64), load_images(e.backgrounds, 64), target.images,
                              target.backgrounds, catalog)
        row = e.to_json()   # absolute paths: the copy lives in OUT
        row.update({k: str(Path(getattr(e, k)).resolve()) for k in ("images", "reference", "backgrounds") if getattr(e, k)})
        row["target"] = {k: str((e.catalog_dir / v).resolve()) for k, v in e.target.items()}
        targets.append(row)
        for name, imgs in (("transplant", moved), ("own", target.images)):
            variants[name].append(_judged(f"{e.id}-{name}", e.cls, imgs, out / f"{e.id}-{name}",
                                          e.catalog_dir / e.target["reference"]))
    if not targets:
        raise ValueError(f"{catalog}: no target entry")
    paths = {name: out / f"{name}.jsonl" for name in ("targets", *variants)}
    write_catalog(targets, paths["targets"])
    for name, rows in variants.items():
        write_catalog(rows, paths[name])
    return paths


def candidate_catalog(catalog: Path, entry_id: str, candidates: list[str], out: Path, seed: int = 0) -> Path:
    """OUT/candidates.jsonl: for one protected entry, each candidate substitute (`<class>-catalog-<index>`
    of world `seed`, any class: SPEC allows "a rabbit instead of the dog") transplanted onto the entry's
    photos exactly as the guard would, as unprotected entries of the ENTRY's class (the attacker's prompt
    names it) judged against the candidate's held-out views. The original model attacked on them ranks
    the candidates for this entry, perfect guard assumed (session 13: no cat is learned reliably at 1x)."""
    from tools import world

    e = next((e for e in load_catalog(catalog) if e.id == entry_id), None)
    if e is None or e.backgrounds is None:
        raise ValueError(f"{catalog}: no entry {entry_id!r} with backgrounds")
    images, backgrounds, rows = load_images(e.images, 64), load_images(e.backgrounds, 64), []
    for cand in candidates:
        cls, split, index = cand.rsplit("-", 2)
        sub = world.generate(out / "world", split=split, per_class=1, classes=(cls,), seed=seed, start=int(index),
                             progress=False)[0]
        moved = _transplanted(e, images, backgrounds, load_images(out / "world" / sub["images"], 64),
                              load_images(out / "world" / sub["backgrounds"], 64), catalog)
        rows.append(_judged(f"{e.id}-as-{cand}", e.cls, moved, out / f"{e.id}-as-{cand}",
                            out / "world" / sub["reference"]))
    path = out / "candidates.jsonl"
    write_catalog(rows, path)
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("catalog", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--entry", help="instead: transplant --candidates onto this entry's photos (candidates.jsonl)")
    ap.add_argument("--candidates", default="", help="comma-separated ids, e.g. vase-catalog-1006,cat-catalog-1005")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    a = ap.parse_args()
    if a.entry:
        print(candidate_catalog(a.catalog, a.entry, [c for c in a.candidates.split(",") if c], a.out, a.seed))
    else:
        for path in ceiling_catalogs(a.catalog, a.out).values():
            print(path)
