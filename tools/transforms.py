"""Image transformations an attacker applies to scraped photos before fine-tuning (SPEC section 2).

A transform is a string "name:value": jpeg:75 (quality), blur:1.0 (Gaussian sigma in pixels),
resize:0.5 (down-up factor), crop:0.8 (random crop fraction, resized back), noise:0.05 (Gaussian std on
[0, 1]); several chain with "+", e.g. "resize:0.5+jpeg:75".
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

NAMES = ("jpeg", "blur", "resize", "crop", "noise")


def parse(spec: str | None) -> list[tuple[str, float]]:
    if not spec:
        return []
    steps = []
    for part in spec.split("+"):
        name, _, value = part.partition(":")
        if name not in NAMES or not value:
            raise ValueError(f"bad transform {part!r}: expected one of {NAMES} as name:value, e.g. jpeg:75")
        try:
            steps.append((name, float(value)))
        except ValueError as e:
            raise ValueError(f"bad transform {part!r}: {value!r} is not a number") from e
    return steps


def _apply_one(im: Image.Image, name: str, v: float, rng: np.random.Generator) -> Image.Image:
    if name == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(v))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if name == "blur":
        return im.filter(ImageFilter.GaussianBlur(v))
    if name == "resize":
        small = im.resize((max(1, int(im.width * v)), max(1, int(im.height * v))), Image.BICUBIC)
        return small.resize(im.size, Image.BICUBIC)
    if name == "crop":
        w, h = int(im.width * v), int(im.height * v)
        x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        return im.crop((x, y, x + w, y + h)).resize(im.size, Image.BICUBIC)
    arr = np.asarray(im).astype(np.float32) / 255.0 + rng.normal(0, v, (im.height, im.width, 3))
    return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))


def apply(images: torch.Tensor, spec: str | None, seed: int = 0) -> torch.Tensor:
    """Apply a transform chain to a (N, 3, H, W) float batch in [0, 1]."""
    steps = parse(spec)
    if not steps:
        return images
    rng = np.random.default_rng(seed)
    out = []
    for x in images:
        im = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        for name, v in steps:
            im = _apply_one(im, name, v, rng)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)
