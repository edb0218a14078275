"""`persguard shards build`: WebDataset tar shards of image + caption + metadata.

Sources: the embedded world (a split's identities, rendered deterministically), or a user's folder of
images with captions beside them (`x.jpg` + `x.txt`, or `x.json` with a "caption" field). Each sample
holds `png` (or the source's own encoded bytes), `txt` and `json` (metadata: identity, class, source).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tools import world
from train.catalog import IMAGE_SUFFIXES


class ShardSourceError(ValueError):
    pass


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def world_samples(split: str, per_class: int, views: int, seed: int, start: int = 0):
    for cls in world.CLASSES:
        for i in range(start, start + per_class):
            ident = world.identity(cls, split, i, seed)
            for v in range(views):
                image, _ = world.render(ident, v)
                yield {"__key__": f"{ident.id}-{v:03d}", "png": _png(image), "txt": world.caption(ident, v),
                       "json": json.dumps({"identity": ident.id, "class": cls, "split": split, "view": v,
                                           "source": "world", "seed": seed})}


def _caption_for(image_path: Path) -> str:
    txt, js = image_path.with_suffix(".txt"), image_path.with_suffix(".json")
    if txt.is_file():
        return txt.read_text().strip()
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except json.JSONDecodeError as e:
            raise ShardSourceError(f"{js}: not valid JSON ({e.msg})") from e
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"].strip()
        raise ShardSourceError(f"{js}: no string field 'caption'")
    raise ShardSourceError(f"{image_path}: no caption ({txt.name} or {js.name} with a 'caption' field)")


def folder_samples(folder: Path):
    """Images under `folder` (recursively) with their captions; every problem is reported at once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardSourceError(f"{folder}: not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ShardSourceError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    problems, rows = [], []
    for p in images:
        try:
            with Image.open(p) as im:
                im.verify()
            rows.append((p, _caption_for(p)))
        except ShardSourceError as e:
            problems.append(str(e))
        except (UnidentifiedImageError, OSError) as e:
            problems.append(f"{p}: unreadable image ({e})")
    if problems:
        raise ShardSourceError(f"{len(problems)} problem(s) in {folder}:\n  " + "\n  ".join(problems))
    for p, cap in rows:
        rel = p.relative_to(folder)
        key = str(rel.with_suffix("")).replace("/", "__").replace(".", "_")
        yield {"__key__": key, p.suffix.lower().lstrip(".").replace("jpeg", "jpg"): p.read_bytes(), "txt": cap,
               "json": json.dumps({"path": str(rel), "source": "folder"})}


def write_shards(samples, out: Path, prefix: str = "shard", maxcount: int = 1000, total: int | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for s in tqdm(samples, total=total, desc="shards"):
            sink.write(s)
    return sorted(out.glob(f"{prefix}-*.tar"))
