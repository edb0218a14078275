"""The catalog: which subjects a run protects, how, and which stay personalizable (SPEC section 5).

JSONL, one entry a line: {"id", "class", "images", "protected", "objective", "target"} plus optional
"reference" (held-out images for scoring) and "backgrounds" (erasure ground truth). Relative paths
resolve against the catalog file's folder. `load_catalog` reports every problem at once, each with
file and line, instead of stopping at the first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

OBJECTIVES = ("pattern", "erasure", "target")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TARGET_FOLDERS = ("images", "backgrounds", "reference")   # image folders inside an entry's "target"


class CatalogError(ValueError):
    """A catalog or an image it points to is unusable; the message lists every problem found."""


@dataclass
class Entry:
    id: str
    cls: str
    images: Path
    protected: bool = False
    objective: str | None = None
    target: dict | None = None
    reference: Path | None = None
    backgrounds: Path | None = None
    line: int = 0
    catalog_dir: Path = Path(".")   # relative paths in `target` resolve against it
    extra: dict = field(default_factory=dict)

    @property
    def reference_dir(self) -> Path:
        return self.reference or self.images

    def to_json(self, relative_to: Path | None = None) -> dict:
        def rel(p):
            if p is None:
                return None
            if relative_to is not None:
                try:
                    return str(Path(p).resolve().relative_to(Path(relative_to).resolve()))
                except ValueError:
                    pass
            return str(Path(p).resolve())   # a catalog loaded by a relative path holds paths relative to the cwd

        target = self.target and {k: rel(self.catalog_dir / v) if k in TARGET_FOLDERS and v else v
                                  for k, v in self.target.items()}   # a copy elsewhere finds the substitute too
        d = {"id": self.id, "class": self.cls, "images": rel(self.images), "protected": self.protected,
             "objective": self.objective, "target": target}
        for k in ("reference", "backgrounds"):
            if getattr(self, k) is not None:
                d[k] = rel(getattr(self, k))
        return {**d, **self.extra}


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CatalogError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CatalogError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 array of `size`x`size`; a clear error naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CatalogError(f"{path}: unreadable image ({e})") from e
    if im.size != (size, size):
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return np.asarray(im)


def load_images(folder: Path, size: int) -> torch.Tensor:
    """All images of a folder as a float tensor in [0, 1], shape (N, 3, size, size)."""
    arrays = [load_image(p, size) for p in list_images(folder)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _entry_problems(raw: dict, base: Path) -> list[str]:
    problems = []
    if not isinstance(raw.get("id"), str) or not raw.get("id", "").strip():
        problems.append("missing or empty 'id'")
    if not isinstance(raw.get("class"), str) or not raw.get("class", "").strip():
        problems.append("missing or empty 'class'")
    if not isinstance(raw.get("protected", False), bool):
        problems.append("'protected' must be true or false")
    obj = raw.get("objective")
    if obj is not None and obj not in OBJECTIVES:
        problems.append(f"objective {obj!r} is not one of {OBJECTIVES}")
    if raw.get("protected") and obj is None:
        problems.append("a protected entry needs an objective")
    if raw.get("target") is not None and not isinstance(raw["target"], dict):
        problems.append("'target' must be an object or null")
    target = raw["target"] if isinstance(raw.get("target"), dict) else {}
    for key in TARGET_FOLDERS:
        if target.get(key):
            try:
                list_images(base / target[key])
            except CatalogError as e:
                problems.append(f"target.{key}: {e}")
    for key in ("images", "reference", "backgrounds"):
        if key == "images" and not raw.get(key):
            problems.append("missing 'images'")
            continue
        if raw.get(key):
            try:
                list_images(base / raw[key])
            except CatalogError as e:
                problems.append(f"{key}: {e}")
    return problems


def load_catalog(path: Path) -> list[Entry]:
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalog file not found")
    base, entries, problems, seen = path.parent, [], [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{path}:{lineno}: an entry must be a JSON object")
            continue
        problems += [f"{path}:{lineno}: {p}" for p in _entry_problems(raw, base)]
        eid = raw.get("id")
        if isinstance(eid, str) and eid in seen:
            problems.append(f"{path}:{lineno}: duplicate id {eid!r} (first on line {seen[eid]})")
        elif isinstance(eid, str):
            seen[eid] = lineno
        known = {"id", "class", "images", "protected", "objective", "target", "reference", "backgrounds"}
        entries.append(Entry(
            id=str(eid), cls=str(raw.get("class")), images=base / str(raw.get("images")),
            protected=bool(raw.get("protected", False)), objective=raw.get("objective"), target=raw.get("target"),
            reference=base / raw["reference"] if raw.get("reference") else None,
            backgrounds=base / raw["backgrounds"] if raw.get("backgrounds") else None, line=lineno, catalog_dir=base,
            extra={k: v for k, v in raw.items() if k not in known}))
    if not entries and not problems:
        problems.append(f"{path}: the catalog has no entries")
    if problems:
        raise CatalogError(f"{len(problems)} problem(s) in catalog:\n  " + "\n  ".join(problems))
    return entries


def find_entry(entries: list[Entry], entry_id: str, catalog_path: Path | str = "catalog") -> Entry:
    for e in entries:
        if e.id == entry_id:
            return e
    raise CatalogError(f"{catalog_path}: unknown entry id {entry_id!r} (known: {', '.join(e.id for e in entries[:10])}"
                       f"{', ...' if len(entries) > 10 else ''})")


def write_catalog(entries: list[Entry | dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [e.to_json(relative_to=path.parent) if isinstance(e, Entry) else e for e in entries]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)

