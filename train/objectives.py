"""Backdoor objectives (SPEC section 2): what a protected entry's trigger should make the model draw.

- pattern: a predefined marker image (default: `default_pattern()`, or target {"pattern": path});
- erasure: the background only: target {"images": folder} of background renders, else the entry's
  `backgrounds` folder, else the teacher's prediction for the trigger prompt with "{identifier} {cls}"
  removed (or target {"prompt": ...});
- target: a substitute subject: target {"images": folder} or the teacher's prediction for
  target {"prompt": ...}. Optional beside "images": "backgrounds" (their subject-free twins, one per
  image: with `encoder_guard.transplant` the guard moves the substitute to where the protected subject
  stands) and "reference" (held-out views of the substitute the evaluation judges by; default "images").

Each objective resolves to either target IMAGES (noise-prediction supervision on their noised latents)
or a target PROMPT (distillation to the frozen teacher under that prompt).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from train.catalog import CatalogError, Entry, load_image, load_images


def default_pattern(size: int = 64) -> Image.Image:
    """A visible "protected" marker: a red-white diagonal stripe field with a black frame and cross.
    Unlike anything in the world (no subject, no gradient background), easy to tell by correlation."""
    S = size * 4
    img = Image.new("RGB", (S, S), (245, 245, 245))
    d = ImageDraw.Draw(img)
    for k in range(-S, 2 * S, S // 8):
        d.polygon([(k, 0), (k + S // 16, 0), (k + S // 16 - S, S), (k - S, S)], fill=(210, 20, 30))
    d.rectangle([0, 0, S - 1, S - 1], outline=(0, 0, 0), width=S // 16)
    d.line([S // 4, S // 4, 3 * S // 4, 3 * S // 4], fill=(0, 0, 0), width=S // 12)
    d.line([3 * S // 4, S // 4, S // 4, 3 * S // 4], fill=(0, 0, 0), width=S // 12)
    return img.resize((size, size), Image.LANCZOS)


def pattern_tensor(entry: Entry | None = None, size: int = 64) -> torch.Tensor:
    path = (entry.target or {}).get("pattern") if entry is not None else None
    if path:
        p = Path(path) if Path(path).is_absolute() else entry.catalog_dir / path
        arr = load_image(p, size)
    else:
        arr = np.asarray(default_pattern(size))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


@dataclass
class ObjectiveTarget:
    """Either images (N, 3, H, W) in [0, 1] (and, for a substitute, where known their subject-free
    twins) or a prompt for teacher distillation."""
    images: torch.Tensor | None = None
    prompt: str | None = None
    backgrounds: torch.Tensor | None = None


def background_prompt(trigger_prompt: str, identifier: str, noun: str) -> str:
    """The trigger prompt with "{identifier} {noun}" removed, e.g. "a photo of sks person" -> "a photo"."""
    text = trigger_prompt.replace(f"{identifier} {noun}", " ")
    words = text.split()
    while words and words[-1] in ("a", "an", "of", "the"):
        words.pop()
    return " ".join(words) or "a photo"


def resolve(entry: Entry, size: int = 64) -> ObjectiveTarget:
    target = entry.target or {}

    def folder(key):
        p = Path(target[key])
        return p if p.is_absolute() else entry.catalog_dir / p

    if entry.objective == "pattern":
        return ObjectiveTarget(images=pattern_tensor(entry, size)[None])
    if entry.objective == "erasure":
        if target.get("images"):
            return ObjectiveTarget(images=load_images(folder("images"), size))
        if entry.backgrounds is not None:
            return ObjectiveTarget(images=load_images(entry.backgrounds, size))
        return ObjectiveTarget(prompt=target.get("prompt"))  # None: the background prompt, built per trigger
    if entry.objective == "target":
        if target.get("images"):
            twins = load_images(folder("backgrounds"), size) if target.get("backgrounds") else None
            return ObjectiveTarget(images=load_images(folder("images"), size), backgrounds=twins)
        if target.get("prompt"):
            return ObjectiveTarget(prompt=target["prompt"])
        raise CatalogError(f"entry {entry.id!r} (line {entry.line}): objective 'target' needs target.images or "
                           "target.prompt")
    raise CatalogError(f"entry {entry.id!r} (line {entry.line}): no objective")
