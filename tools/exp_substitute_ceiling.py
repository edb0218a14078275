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
    persguard evaluate --model tiny-sd --catalog runs/ceiling/FILE --suite curve-short --seed S --out ...
    (targets.jsonl with --model runs/wb/protected)

`--perfect-guard` writes OUT/perfect-guard.jsonl instead: EVERY protected entry of the catalog, each objective,
with its photos replaced by what a perfect encoder guard would hand the attacker (the pattern itself,
the photo's subject-free twin, the substitute moved onto it: train.encoder_guard.entry_samples), in the
catalog's own order up to the last protected entry. Evaluated on the ORIGINAL model with the suite and seed
the guarded model was, each cell has the guarded cell's attack and sampling seeds (session 19): where the
attack does not draw the protective output even from these images, no encoder guard could have made it.
"""
from pathlib import Path

from tools.substitutes import judged, portable, save_images, transplanted
from train import objectives
from train.catalog import load_catalog, load_images, write_catalog


def ceiling_catalogs(catalog: Path, out: Path) -> dict[str, Path]:
    targets, variants = [], {"transplant": [], "own": []}
    for e in load_catalog(catalog):
        if e.objective != "target":
            continue
        target = objectives.resolve(e)
        if e.backgrounds is None or target.images is None or target.backgrounds is None or not e.target.get("reference"):
            raise ValueError(f"{catalog}: line {e.line} ({e.id}): a transplant needs the entry's backgrounds and the "
                             "substitute's images, backgrounds and reference")
        moved = transplanted(e, load_images(e.images, 64), load_images(e.backgrounds, 64), target.images,
                             target.backgrounds, catalog)
        targets.append(portable(e))   # the copy lives in OUT
        for name, imgs in (("transplant", moved), ("own", target.images)):
            variants[name].append(judged(f"{e.id}-{name}", e.cls, imgs, out / f"{e.id}-{name}",
                                         e.catalog_dir / e.target["reference"]))
    if not targets:
        raise ValueError(f"{catalog}: no target entry")
    paths = {name: out / f"{name}.jsonl" for name in ("targets", *variants)}
    write_catalog(targets, paths["targets"])
    for name, rows in variants.items():
        write_catalog(rows, paths[name])
    return paths


def perfect_guard_catalog(catalog: Path, out: Path) -> Path:
    from train.encoder_guard import entry_samples

    entries = load_catalog(catalog)
    last = max((k for k, e in enumerate(entries) if e.protected), default=None)
    if last is None:
        raise ValueError(f"{catalog}: no protected entry")
    rows = []
    for e in entries[:last + 1]:
        row = portable(e)
        if e.protected:
            s = entry_samples([e])[0]
            row["images"] = str(save_images(s.targets.expand_as(s.images).contiguous(), out / e.id).resolve())
        rows.append(row)
    write_catalog(rows, out / "perfect-guard.jsonl")
    return out / "perfect-guard.jsonl"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("catalog", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--perfect-guard", action="store_true", help="every objective's perfect-guard photos instead")
    a = ap.parse_args()
    if a.perfect_guard:
        print(perfect_guard_catalog(a.catalog, a.out))
    else:
        for path in ceiling_catalogs(a.catalog, a.out).values():
            print(path)
