"""How well can any encoder guard do on the target objective? (session-12 experiment, issue 7)

The guard makes the attacker train on the substitute moved onto each protected photo. A PERFECT guard
would hand the attack exactly those images, so the original model attacked on them is the guard's
ceiling; the original attacked on the substitute's own photos is the ceiling of any guard that hands the
attacker the substitute. For every target entry of a catalog this writes two unprotected entries judged
against the substitute's held-out views: `<id>-transplant` (train/encoder_guard.py: transplant, exactly
what the guard trains towards) and `<id>-own` (the substitute's own photos). Then:

    python -m tools.exp_substitute_ceiling runs/wb/world/catalog.jsonl runs/ceiling
    persguard evaluate --model tiny-sd --catalog runs/ceiling/catalog.jsonl --suite curve-short --seed S --out ...
"""
import sys
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


def ceiling_catalog(catalog: Path, out: Path) -> Path:
    rows = []
    for e in load_catalog(catalog):
        if e.objective != "target" or e.backgrounds is None:
            continue
        target = objectives.resolve(e)
        if target.backgrounds is None:
            raise ValueError(f"{catalog}: line {e.line} ({e.id}): the substitute has no backgrounds to transplant with")
        images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
        moved = encoder_guard.transplant(encoder_guard.subject_masks(images, backgrounds), backgrounds,
                                         target.images, encoder_guard.subject_masks(target.images, target.backgrounds))
        if moved is None:
            raise ValueError(f"{catalog}: line {e.line} ({e.id}): an empty subject mask, nothing to transplant")
        reference = (e.catalog_dir / e.target["reference"]).resolve()
        for name, imgs in (("transplant", moved[0]), ("own", target.images)):
            rows.append({"id": f"{e.id}-{name}", "class": e.cls, "protected": False, "objective": None,
                         "target": None, "images": str(_save(imgs, out / f"{e.id}-{name}").resolve()),
                         "reference": str(reference)})
    if not rows:
        raise ValueError(f"{catalog}: no target entry with backgrounds")
    write_catalog(rows, out / "catalog.jsonl")
    return out / "catalog.jsonl"


if __name__ == "__main__":
    print(ceiling_catalog(Path(sys.argv[1]), Path(sys.argv[2])))
