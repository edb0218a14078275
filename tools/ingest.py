"""`persguard catalog build` and `persguard catalog split`: a validated catalog from messy real-world data.

Source: a folder tree (one sub-folder per entry, `DIR/<id>/` or `DIR/<class>/<id>/`, optionally with an
`entry.json` holding class/protected/objective/target) or a CSV with columns id,class,image[,protected,
objective,target] (one row per image; paths relative to the CSV; `image` may also name a folder).

Every image is decoded in a process pool, EXIF-oriented, converted to RGB (alpha flattened on white,
16-bit scaled), center-cropped and resized. Nothing is skipped silently: each dropped or ignored file,
each duplicate and each excluded entry becomes a problem {kind, severity, file, entry, reason} in
`summary.json` / `summary.md`. Errors (severity "error") mean the input contradicts itself (an id used
twice, bad entry metadata) and a person has to fix it; the affected entries are left out.

Duplicates are found by the sha256 of the normalized pixels (exact) and by a 64-bit DCT perceptual hash
(near: Hamming distance <= `near_dup_bits`, confirmed by a small-thumbnail pixel difference so that
two merely similar pictures are not merged). Inside an entry one copy is kept (the largest original).
Across entries nothing is dropped: the same picture under two ids is a possible mislabel or one subject
under two ids, so both entries are flagged (summary `cross_entry_duplicates`, catalog field `review`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Top-level imports stay light (no torch): pool workers import this module.
CANDIDATE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ENTRY_JSON = "entry.json"
ERROR_KINDS = ("duplicate_id", "bad_metadata", "bad_row")
DROP_KINDS = ("empty_file", "unreadable", "unsupported", "too_small", "too_large", "missing_file")
OUTPUT_NAMES = ("images", "shards", "catalog.jsonl", "summary.json", "summary.md")
# Near-duplicate confirmation: mean absolute difference of 16x16 RGB thumbnails, in 0..255 units. The
# hash alone is not enough: on 7,201 distinct 64 px world renders (tools/messy_catalog.py, 1,000 entries)
# 38 pairs of different pictures were within 4 bits; their difference was >= 16, the planted resized and
# re-encoded copies' <= 5.3.
NEAR_DUP_MAX_MEAN_DIFF = 10.0
_OBJECTIVES = ("pattern", "erasure", "target")   # train.catalog.OBJECTIVES (not imported: it loads torch)
_TARGET_PATH_KEYS = ("pattern", "images", "backgrounds", "reference")


class IngestError(ValueError):
    """The source cannot be read at all (missing, wrong columns) or the output folder is unsafe."""


def _problem(kind: str, reason: str, file=None, entry: str | None = None, **extra) -> dict:
    p = {"kind": kind, "severity": "error" if kind in ERROR_KINDS else "warning", "file": None if file is None
         else str(file), "entry": entry, "reason": reason}
    return {**p, **extra}


@dataclass
class SourceEntry:
    """One entry as found in the source, before any image is decoded."""
    id: str
    cls: str | None
    origin: str                          # folder or "file.csv:lines" for messages
    files: list[Path] = field(default_factory=list)
    protected: bool = False
    objective: str | None = None
    target: dict | None = None
    extra: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------- metadata
def _check_id(eid) -> str | None:
    if not isinstance(eid, str) or not eid.strip():
        return "missing or empty id"
    if eid != eid.strip() or eid in (".", "..") or any(c in eid for c in "/\\") or eid.startswith("."):
        return f"id {eid!r} cannot name a folder (no slashes, no leading dot or surrounding spaces)"
    if any(ord(c) < 32 for c in eid):
        return f"id {eid!r} contains control characters"
    return None


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("", "0", "false", "no", "n"):
        return False
    if v in ("1", "true", "yes", "y"):
        return True
    raise ValueError(f"'protected' must be true or false, not {value!r}")


def _apply_meta(entry: SourceEntry, meta: dict, base: Path, where: str) -> None:
    """Check class/protected/objective/target (what load_catalog and the objectives need) into `entry`;
    relative target paths resolve against `base` and are written absolute."""
    def err(reason):
        entry.errors.append(_problem("bad_metadata", reason, file=where, entry=entry.id))

    if "class" in meta and meta["class"] is not None:
        if isinstance(meta["class"], str) and meta["class"].strip():
            entry.cls = meta["class"].strip()
        else:
            err(f"'class' must be a non-empty string, not {meta['class']!r}")
    try:
        entry.protected = _parse_bool(meta.get("protected", False))
    except ValueError as e:
        err(str(e))
    obj = meta.get("objective")
    obj = None if obj in (None, "") else obj
    if obj is not None and obj not in _OBJECTIVES:
        err(f"objective {obj!r} is not one of {_OBJECTIVES}")
    entry.objective = obj
    if entry.protected and obj is None:
        err("a protected entry needs an objective")
    target = meta.get("target")
    if target in (None, ""):
        target = None
    elif not isinstance(target, dict):
        err(f"'target' must be an object or null, not {target!r}")
        target = None
    else:
        target = dict(target)
        for key in _TARGET_PATH_KEYS:
            if isinstance(target.get(key), str):
                p = Path(target[key]) if Path(target[key]).is_absolute() else base / target[key]
                if not p.exists():
                    err(f"target.{key}: {p} does not exist")
                target[key] = str(p.resolve())
    if obj == "target" and not (target and (target.get("images") or target.get("prompt"))):
        err("objective 'target' needs target.images or target.prompt")
    entry.target = target
    entry.extra = {k: v for k, v in meta.items() if k not in ("id", "class", "protected", "objective", "target")}


def _read_entry_json(entry: SourceEntry, folder: Path) -> None:
    path = folder / ENTRY_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        entry.errors.append(_problem("bad_metadata", f"not valid JSON ({e})", file=path, entry=entry.id))
        return
    if not isinstance(meta, dict):
        entry.errors.append(_problem("bad_metadata", "must be a JSON object", file=path, entry=entry.id))
        return
    if "id" in meta and meta["id"] != entry.id:
        entry.errors.append(_problem("bad_metadata", f"id {meta['id']!r} differs from the folder name "
                                     f"{entry.id!r}", file=path, entry=entry.id))
    reserved = [k for k in ("images", "reference", "backgrounds") if k in meta]
    if reserved:
        entry.errors.append(_problem("bad_metadata", f"{', '.join(reserved)}: set by the builder, not by "
                                     "entry.json", file=path, entry=entry.id))
    _apply_meta(entry, meta, folder, str(path))


# --------------------------------------------------------------------------------------- scanning
def _entry_from_folder(folder: Path, parent_cls: str | None, default_cls: str | None,
                       problems: list) -> SourceEntry:
    entry = SourceEntry(id=folder.name, cls=parent_cls or default_cls, origin=str(folder))
    bad_id = _check_id(folder.name)
    if bad_id:
        entry.errors.append(_problem("bad_metadata", bad_id, file=folder, entry=folder.name))
    if (folder / ENTRY_JSON).is_file():
        _read_entry_json(entry, folder)
        if parent_cls and entry.cls != parent_cls:
            problems.append(_problem("class_conflict", f"entry.json class {entry.cls!r} overrides the parent "
                                     f"folder's {parent_cls!r}", file=folder / ENTRY_JSON, entry=entry.id))
    for p in sorted(folder.iterdir()):
        if p.name == ENTRY_JSON:
            continue
        if p.is_dir():
            problems.append(_problem("ignored_folder", "nested folder inside an entry: not read", file=p,
                                     entry=entry.id))
        elif p.name.startswith("."):
            problems.append(_problem("ignored_file", "hidden file: not read", file=p, entry=entry.id))
        elif p.suffix.lower() not in CANDIDATE_SUFFIXES:
            problems.append(_problem("ignored_file", f"not an image file name ({', '.join(CANDIDATE_SUFFIXES)})",
                                     file=p, entry=entry.id))
        else:
            entry.files.append(p)
    if not entry.cls and entry.files:        # an empty folder is reported as empty, not as classless
        entry.errors.append(_problem("bad_metadata", "no class: use DIR/<class>/<id>/, an entry.json with "
                                     "'class', or --class", file=folder, entry=entry.id))
    return entry


def _looks_like_entry(folder: Path) -> bool:
    return any(p.is_file() and (p.name == ENTRY_JSON or p.suffix.lower() in CANDIDATE_SUFFIXES)
               for p in folder.iterdir())


def scan_folder(source: Path, default_cls: str | None = None) -> tuple[list[SourceEntry], list[dict]]:
    """Entries of a folder tree. A top-level folder holding images (or entry.json) is an entry; one holding
    only folders is a class folder whose sub-folders are entries; an empty one is an (empty) entry."""
    entries, problems = [], []
    for top in sorted(Path(source).iterdir()):
        if top.name.startswith("."):
            problems.append(_problem("ignored_file" if top.is_file() else "ignored_folder", "hidden: not read",
                                     file=top))
        elif not top.is_dir():
            problems.append(_problem("ignored_file", "file at the top level, outside any entry folder: not read",
                                     file=top))
        elif _looks_like_entry(top) or not any(p.is_dir() for p in top.iterdir()):
            entries.append(_entry_from_folder(top, None, default_cls, problems))
        else:
            for p in sorted(top.iterdir()):
                if p.is_dir() and not p.name.startswith("."):
                    entries.append(_entry_from_folder(p, top.name, default_cls, problems))
                else:
                    problems.append(_problem("ignored_file", f"inside class folder {top.name!r}, outside any "
                                             "entry folder: not read", file=p))
    return entries, problems


def scan_csv(path: Path, default_cls: str | None = None) -> tuple[list[SourceEntry], list[dict]]:
    """Entries of a CSV, one row per image (or per folder of images). Rows of one id must agree on class,
    protected, objective and target: an id defined differently on two lines is a `duplicate_id` error
    (two subjects under one id) naming the lines; the entry is left out."""
    path = Path(path)
    base = path.parent
    problems: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: cannot read the CSV ({e})") from e
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("id", "class", "image") if c not in columns]
    if missing:
        raise IngestError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(columns) or 'none'})")
    reader.fieldnames = columns
    rows: dict[str, list[tuple[int, dict]]] = {}
    order: list[int] = []
    for row in reader:
        line = reader.line_num
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        eid = row.get("id", "")
        bad = _check_id(eid) or ("" if row.get("image") else "empty 'image'")
        if bad:
            problems.append(_problem("bad_row", bad, file=f"{path}:{line}", entry=eid or None, line=line))
            continue
        rows.setdefault(eid, []).append((line, row))
        order.append(line)
    entries = []
    for eid, items in rows.items():
        lines = [ln for ln, _ in items]
        entry = SourceEntry(id=eid, cls=default_cls, origin=f"{path}:{_ranges(lines)}")
        variants: dict[tuple, list[int]] = {}
        for ln, row in items:
            key = tuple(row.get(c, "") or "" for c in ("class", "protected", "objective", "target"))
            variants.setdefault(key, []).append(ln)
        if len(variants) > 1:
            desc = "; ".join(f"lines {_ranges(v)}: class={k[0]!r} protected={k[1]!r} objective={k[2]!r}"
                             + (f" target={k[3]!r}" if k[3] else "") for k, v in variants.items())
            entry.errors.append(_problem("duplicate_id", f"id {eid!r} is defined differently ({desc})",
                                         file=f"{path}:{_ranges(lines)}", entry=eid, lines=lines))
        line0, row0 = items[0]
        meta = {"class": row0.get("class") or None, "protected": row0.get("protected", ""),
                "objective": row0.get("objective") or None}
        if row0.get("target"):
            try:
                meta["target"] = json.loads(row0["target"])
            except json.JSONDecodeError:
                meta["target"] = {"prompt": row0["target"]}   # a bare string is a target prompt
        _apply_meta(entry, meta, base, f"{path}:{line0}")
        for err in entry.errors:
            err.setdefault("lines", lines)
        if not entry.cls:
            entry.errors.append(_problem("bad_row", "no class (empty 'class' and no --class)",
                                         file=f"{path}:{line0}", entry=eid, lines=lines))
        blocks = _blocks(lines, order)
        if blocks > 1 and len(variants) == 1:
            problems.append(_problem("split_id", f"id {eid!r} appears in {blocks} separate blocks (lines "
                                     f"{_ranges(lines)}): read as one entry; check it is one subject",
                                     file=str(path), entry=eid, lines=lines))
        seen: dict[Path, int] = {}
        for ln, row in items:
            p = Path(row["image"])
            p = p if p.is_absolute() else base / p
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in CANDIDATE_SUFFIXES)
                if not found:
                    problems.append(_problem("missing_file", "folder holds no image files", file=p, entry=eid,
                                             line=ln))
            else:
                found = [p]
            for q in found:
                if q in seen:
                    problems.append(_problem("duplicate_row", f"listed again (first on line {seen[q]}): read once",
                                             file=q, entry=eid, line=ln))
                    continue
                seen[q] = ln
                if not q.exists():
                    problems.append(_problem("missing_file", f"no such file (line {ln})", file=q, entry=eid, line=ln))
                else:
                    entry.files.append(q)
        entries.append(entry)
    return entries, problems


def _ranges(lines: list[int]) -> str:
    out, start = [], None
    for i, ln in enumerate(lines):
        if start is None:
            start = ln
        if i + 1 == len(lines) or lines[i + 1] != ln + 1:
            out.append(str(start) if start == ln else f"{start}-{ln}")
            start = None
    return ",".join(out)


def _blocks(lines: list[int], order: list[int]) -> int:
    """How many runs of consecutive valid rows the id's lines form."""
    pos = {ln: i for i, ln in enumerate(order)}
    idx = sorted(pos[ln] for ln in lines)
    return 1 + sum(1 for a, b in zip(idx, idx[1:]) if b != a + 1)


# ---------------------------------------------------------------------------------------- images
def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: the 8x8 lowest DCT frequencies of a 32x32 grayscale, each bit = above the
    median (the DC term is left out of the median). Resizing and re-encoding move few bits."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.BOX), dtype=np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def _icc_to_srgb(im: Image.Image) -> Image.Image | None:
    """CMYK (with its embedded ICC profile) or LAB to sRGB through littleCMS; None when no transform applies."""
    from PIL import ImageCms

    try:
        if im.mode == "LAB":
            src = ImageCms.createProfile("LAB")
        elif im.mode == "CMYK" and im.info.get("icc_profile"):
            src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        else:
            return None
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16/32-bit and float grayscale scaled to 8 bits, alpha composited on white,
    CMYK through its ICC profile when it has one (else PIL's naive formula), LAB through littleCMS."""
    if im.mode in ("CMYK", "LAB"):
        managed = _icc_to_srgb(im)
        if managed is not None:
            return managed
        if im.mode == "LAB":
            raise ValueError("conversion from LAB to RGB failed (no littleCMS)")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0                      # 16-bit range
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0                      # float in [0, 1]
        im = Image.fromarray(a.clip(0, 255).round().astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return im.convert("RGB")


def _normalize(task: tuple) -> dict:
    """Pool worker: one file to {ok, png, sha, hash, thumb, ...} or {ok: False, kind, reason}. Never raises."""
    index, path, size, min_size = task
    out = {"index": index, "ok": False}
    try:
        if os.path.getsize(path) == 0:
            return {**out, "kind": "empty_file", "reason": "zero-byte file"}
        with Image.open(path) as im:
            mode, fmt, orig = im.mode, im.format, im.size
            if min(orig) < min_size:
                return {**out, "kind": "too_small", "reason": f"{orig[0]}x{orig[1]}: the short side is under "
                        f"{min_size} px"}
            if fmt == "JPEG":
                im.draft("RGB", (size, size))   # decode at 1/2..1/8 scale: still >= size on both sides
            im.load()
            try:
                orientation = im.getexif().get(0x0112, 1)
                im = ImageOps.exif_transpose(im)
                exif_note = None
            except Exception as e:              # a broken EXIF block: keep the pixels as stored
                orientation, exif_note = 1, f"EXIF unreadable, orientation not applied ({type(e).__name__}: {e})"
            rgb = _to_rgb(im)
    except Image.DecompressionBombError as e:
        return {**out, "kind": "too_large", "reason": str(e)}
    except FileNotFoundError:
        return {**out, "kind": "missing_file", "reason": "no such file"}
    except Exception as e:
        msg = str(e).replace(f"'{path}'", "").replace(str(path), "").strip()
        kind = "unsupported" if isinstance(e, ValueError) and "conversion" in msg else "unreadable"
        return {**out, "kind": kind, "reason": f"{type(e).__name__}: {msg}" if msg else type(e).__name__}
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    norm = rgb.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0)
    pixels = np.asarray(norm)
    buf = io.BytesIO()
    norm.save(buf, format="PNG")
    thumb = np.asarray(norm.resize((16, 16), Image.BOX)).tobytes()
    return {**out, "ok": True, "png": buf.getvalue(), "sha": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "hash": phash(norm), "thumb": thumb, "pixels_orig": orig[0] * orig[1], "size_orig": list(orig),
            "mode": mode, "format": fmt, "rotated": orientation not in (1, None), "exif_note": exif_note}


def _run_pool(tasks: list[tuple], workers: int, progress: bool) -> list[dict]:
    from tqdm import tqdm

    results: list[dict | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc="normalize", unit="img", disable=not progress)
    if workers <= 1 or len(tasks) < 2:
        it = map(_normalize, tasks)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.Pool(workers)
        it = pool.imap_unordered(_normalize, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 8))))
    try:
        for r in it:
            results[r["index"]] = r
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return results


# ------------------------------------------------------------------------------------ duplicates
def _candidate_pairs(hashes: np.ndarray, max_bits: int, chunk: int = 1024):
    """All (i, j), i < j, whose hashes differ in at most `max_bits` bits (chunked brute force: fine for
    ~1e5 images; beyond that a multi-index hash would be needed)."""
    h = hashes.astype(np.uint64)
    for i0 in range(0, len(h), chunk):
        d = np.bitwise_count(h[i0:i0 + chunk, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= max_bits)
        keep = jj > ii + i0
        for i, j in zip((ii + i0)[keep], jj[keep]):
            yield int(i), int(j), int(d[i - i0, j])


def _same_picture(a: dict, b: dict, dist: int) -> str | None:
    """'exact', 'near' or None for two decoded images whose hashes are `dist` bits apart."""
    if a["sha"] == b["sha"]:
        return "exact"
    ta = np.frombuffer(a["thumb"], np.uint8).astype(np.int16)
    tb = np.frombuffer(b["thumb"], np.uint8).astype(np.int16)
    return "near" if float(np.abs(ta - tb).mean()) <= NEAR_DUP_MAX_MEAN_DIFF else None


def _find_duplicates(items: list[dict], near_dup_bits: int) -> list[tuple[int, int, str, int]]:
    """(i, j, kind, distance) over `items` (decoded images); exact matches need no hash search."""
    pairs = {}
    by_sha: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        for j in by_sha.setdefault(it["sha"], []):
            pairs[(j, i)] = ("exact", 0)
        by_sha[it["sha"]].append(i)
    if near_dup_bits >= 0 and len(items) > 1:
        hashes = np.array([it["hash"] for it in items], dtype=np.uint64)
        for i, j, dist in _candidate_pairs(hashes, near_dup_bits):
            if (i, j) not in pairs:
                kind = _same_picture(items[i], items[j], dist)
                if kind:
                    pairs[(i, j)] = (kind, dist)
    return [(i, j, k, d) for (i, j), (k, d) in sorted(pairs.items())]


def _dedup_within(items: list[dict], near_dup_bits: int, entry_id: str, problems: list) -> list[dict]:
    """One image per group of duplicates inside an entry (the largest original, then the first file);
    each dropped copy becomes a `duplicate_within` problem naming the copy kept."""
    parent = list(range(len(items)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links = {}
    for i, j, kind, dist in _find_duplicates(items, near_dup_bits):
        parent[find(j)] = find(i)
        links.setdefault(j, (kind, dist))
        links.setdefault(i, (kind, dist))
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    survivors = []
    for members in groups.values():
        best = max(members, key=lambda i: (items[i]["pixels_orig"], -i))
        survivors.append(best)
        for i in members:
            if i != best:
                kind, dist = links[i]
                problems.append(_problem("duplicate_within", f"{kind} duplicate of {items[best]['file']} (hash "
                                         f"distance {dist}): dropped, that copy kept", file=items[i]["file"],
                                         entry=entry_id, kept=str(items[best]["file"]), match=kind, distance=dist))
    return [items[i] for i in sorted(survivors)]


def _cross_duplicates(flat: list[tuple[str, dict]], near_dup_bits: int, problems: list) -> tuple[list, dict]:
    """Pictures shared by two entries ((entry id, image) pairs): reported and both entries flagged, never
    resolved here (a mislabel and one subject under two ids look the same)."""
    cross, flagged = [], {}
    for i, j, kind, dist in _find_duplicates([r for _, r in flat], near_dup_bits):
        (a, ra), (b, rb) = flat[i], flat[j]
        if a == b:
            continue
        cross.append({"entries": [a, b], "files": [str(ra["file"]), str(rb["file"])], "match": kind,
                      "distance": dist})
        problems.append(_problem("duplicate_across", f"{kind} duplicate of {rb['file']} in entry {b!r} (hash "
                                 f"distance {dist}): same subject under two ids, or a mislabeled image? Both "
                                 "entries kept and flagged", file=ra["file"], entry=a, other_entry=b,
                                 other_file=str(rb["file"]), match=kind, distance=dist))
        for x, y in ((a, b), (b, a)):
            note = f"shares a picture with {y!r} ({kind})"
            if note not in flagged.setdefault(x, []):
                flagged[x].append(note)
    return cross, flagged


# ------------------------------------------------------------------------------------------ build
def _prepare_out(out: Path, source: Path) -> None:
    out, src, o = Path(out), source.resolve(), Path(out).resolve()
    if source.is_dir() and (o == src or src in o.parents):
        raise IngestError(f"{out}: the output folder must not lie inside the source {source}")
    for name in OUTPUT_NAMES:
        if src == o / name or (o / name) in src.parents:
            raise IngestError(f"{source}: the source lies inside {o / name}, which a build replaces")
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").is_file():
            raise IngestError(f"{out}: exists, is not empty and holds no earlier build (no summary.json); "
                              "choose an empty or new --out")
        for name in OUTPUT_NAMES:           # an earlier build: replace only what the builder writes
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build_catalog(source: Path, out: Path, *, cls: str | None = None, min_images: int = 3, min_size: int = 32,
                  size: int = 64, near_dup_bits: int = 4, workers: int | None = None, shard_size: int = 1000,
                  progress: bool = True) -> dict:
    """Read `source`, write out/images/<id>/NNN.png, out/catalog.jsonl (valid entries), out/shards/
    catalog-%06d.tar (sample "<id>/<n>": png, txt "a photo of a <class>", json), out/summary.json and
    out/summary.md; returns the summary. `cls` is the class of entries that name none."""
    t0 = time.time()
    source, out = Path(source), Path(out)
    if not source.exists():
        raise IngestError(f"{source}: no such folder or CSV file")
    if source.is_file() and source.suffix.lower() != ".csv":
        raise IngestError(f"{source}: give a folder tree or a .csv file")
    if min_images < 1 or min_size < 1 or size < 8:
        raise IngestError(f"min_images and min_size must be >= 1 and size >= 8 (got {min_images}, {min_size}, {size})")
    _prepare_out(out, source)
    entries, problems = (scan_folder(source, cls) if source.is_dir() else scan_csv(source, cls))
    if not entries and not problems:
        problems.append(_problem("empty_source", "no entry folders or rows found", file=source))

    # one id twice (e.g. person/alice and cat/alice): every holder is an error, none is picked
    by_id: dict[str, list[SourceEntry]] = {}
    for e in entries:
        by_id.setdefault(e.id, []).append(e)
    for eid, group in by_id.items():
        if len(group) > 1:
            for e in group:
                others = ", ".join(g.origin for g in group if g is not e)
                e.errors.append(_problem("duplicate_id", f"id {eid!r} is also used by {others}", file=e.origin,
                                         entry=eid))

    timings = {"scan": time.time() - t0}
    # decode every image of every entry without errors
    tasks, owner = [], []
    for n, e in enumerate(entries):
        if e.errors:
            continue
        for f in e.files:
            owner.append((n, f))
            tasks.append((len(tasks), str(f), size, min_size))
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    results = _run_pool(tasks, max(1, workers), progress)

    timings["decode"] = time.time() - t0 - sum(timings.values())
    conversions: dict[str, int] = {}
    decoded: dict[int, list[dict]] = {}
    for r, (n, f) in zip(results, owner):
        r["file"], r["entry_n"] = f, n
        if not r["ok"]:
            problems.append(_problem(r["kind"], r["reason"], file=f, entry=entries[n].id))
            continue
        if r["exif_note"]:
            problems.append(_problem("exif_unreadable", r["exif_note"], file=f, entry=entries[n].id))
        if r["mode"] != "RGB":
            conversions[f"{r['mode']} -> RGB"] = conversions.get(f"{r['mode']} -> RGB", 0) + 1
        if r["rotated"]:
            conversions["EXIF orientation applied"] = conversions.get("EXIF orientation applied", 0) + 1
        decoded.setdefault(n, []).append(r)

    kept = {n: _dedup_within(items, near_dup_bits, entries[n].id, problems) for n, items in decoded.items()}

    # entry status
    status: dict[int, str] = {}
    excluded: dict[str, str] = {}
    for n, e in enumerate(entries):
        if e.errors:
            problems += e.errors
            status[n] = "error"
            excluded[e.id] = "; ".join(p["reason"] for p in e.errors)
        elif not e.files:
            problems.append(_problem("empty_entry", "no image files", file=e.origin, entry=e.id))
            status[n], excluded[e.id] = "empty", "no image files"
        elif len(kept.get(n, [])) < min_images:
            k = len(kept.get(n, []))
            problems.append(_problem("too_few_images", f"{k} usable image(s) of {len(e.files)} file(s); at least "
                                     f"{min_images} needed", file=e.origin, entry=e.id))
            status[n], excluded[e.id] = "too_few", f"{k} usable image(s) < {min_images}"
        else:
            status[n] = "ok"

    # across entries among kept images, excluded entries included: a mislabel is news either way
    cross, flagged = _cross_duplicates([(entries[n].id, r) for n in sorted(kept) for r in kept[n]], near_dup_bits,
                                       problems)

    timings["duplicates"] = time.time() - t0 - sum(timings.values())
    # write images, catalog, shards
    from train.catalog import load_catalog, write_catalog   # torch: main process only

    rows, samples_meta, entry_report = [], [], {}
    for n, e in enumerate(entries):
        report = {"class": e.cls, "status": status[n], "source": e.origin, "files": len(e.files),
                  "kept": len(kept.get(n, []))}
        entry_report[e.id if e.id not in entry_report else f"{e.id} @ {e.origin}"] = report
        if status[n] != "ok":
            continue
        folder = out / "images" / e.id
        folder.mkdir(parents=True, exist_ok=True)
        width = max(3, len(str(len(kept[n]) - 1)))
        report["images"] = []
        for k, r in enumerate(kept[n]):
            name = f"{k:0{width}d}.png"
            (folder / name).write_bytes(r["png"])
            report["images"].append([f"images/{e.id}/{name}", str(r["file"])])
            samples_meta.append((e, k, width, r))
        row = {"id": e.id, "class": e.cls, "images": f"images/{e.id}", "protected": e.protected,
               "objective": e.objective, "target": e.target, **e.extra}
        if e.id in flagged:
            row["review"] = flagged[e.id]
            report["review"] = flagged[e.id]
        rows.append(row)

    shard_paths = []
    if rows:
        write_catalog(rows, out / "catalog.jsonl")
        load_catalog(out / "catalog.jsonl")        # the output must satisfy the trainer's own check
        from tools.shards import write_shards

        def samples():
            for e, k, width, r in samples_meta:
                yield {"__key__": f"{e.id}/{k:0{width}d}", "png": r["png"], "txt": f"a photo of a {e.cls}",
                       "json": json.dumps({"id": e.id, "class": e.cls, "index": k, "protected": e.protected})}

        shard_paths = write_shards(samples(), out / "shards", prefix="catalog", maxcount=shard_size,
                                   total=len(samples_meta))

    by_kind: dict[str, int] = {}
    for p in problems:
        by_kind[p["kind"]] = by_kind.get(p["kind"], 0) + 1
    counts = {
        "entries_found": len(entries), "entries_valid": len(rows), "entries_excluded": len(entries) - len(rows),
        "entries_flagged": len(flagged), "images_found": sum(len(e.files) for e in entries),
        "images_decoded": sum(len(v) for v in decoded.values()),
        "images_dropped": sum(by_kind.get(k, 0) for k in DROP_KINDS),
        "duplicates_removed": by_kind.get("duplicate_within", 0), "cross_entry_duplicates": len(cross),
        "images_kept": len(samples_meta), "problems": len(problems),
        "errors": sum(p["severity"] == "error" for p in problems),
    }
    summary = {
        "source": str(source), "out": str(out), "catalog": str(out / "catalog.jsonl") if rows else None,
        "shards": [str(p) for p in shard_paths],
        "settings": {"class": cls, "min_images": min_images, "min_size": min_size, "size": size,
                     "near_dup_bits": near_dup_bits, "near_dup_max_mean_diff": NEAR_DUP_MAX_MEAN_DIFF,
                     "workers": workers},
        "seconds": round(time.time() - t0, 2),
        "timings": {k: round(v, 2) for k, v in {**timings, "write": time.time() - t0 - sum(timings.values())}.items()},
        "counts": counts, "problems_by_kind": dict(sorted(by_kind.items())),
        "conversions": dict(sorted(conversions.items())), "excluded_entries": excluded,
        "flagged_entries": flagged, "cross_entry_duplicates": cross, "problems": problems, "entries": entry_report,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def headline(summary: dict) -> str:
    c = summary["counts"]
    return (f"{c['entries_valid']} of {c['entries_found']} entries valid ({c['entries_excluded']} excluded, "
            f"{c['entries_flagged']} flagged for review); {c['images_kept']} images kept of {c['images_found']} "
            f"files ({c['images_dropped']} dropped, {c['duplicates_removed']} duplicates removed inside entries); "
            f"{c['cross_entry_duplicates']} cross-entry duplicate(s); {c['problems']} problem(s), "
            f"{c['errors']} error(s)")


def summary_markdown(summary: dict) -> str:
    c = summary["counts"]
    lines = [f"# Catalog build: {summary['source']}", "", headline(summary) + ".", "",
             f"Catalog: `{summary['catalog']}`" if summary["catalog"] else "**No valid entry: no catalog written.**",
             f"Shards: {len(summary['shards'])} in `{Path(summary['out']) / 'shards'}`", "",
             "| count | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in c.items()]
    if summary["conversions"]:
        lines += ["", "## Conversions (kept)", ""] + [f"- {k}: {v}" for k, v in summary["conversions"].items()]
    if summary["cross_entry_duplicates"]:
        lines += ["", "## Same picture under two ids (both entries kept, flagged `review`)", "",
                  "| entries | match | files |", "|---|---|---|"]
        lines += [f"| {d['entries'][0]} / {d['entries'][1]} | {d['match']} (distance {d['distance']}) | "
                  f"`{d['files'][0]}` / `{d['files'][1]}` |" for d in summary["cross_entry_duplicates"]]
    if summary["excluded_entries"]:
        lines += ["", "## Excluded entries", ""] + [f"- `{k}`: {v}" for k, v in summary["excluded_entries"].items()]
    kinds = {}
    for p in summary["problems"]:
        if p["kind"] != "duplicate_across":
            kinds.setdefault(p["kind"], []).append(p)
    for kind in sorted(kinds, key=lambda k: (kinds[k][0]["severity"] != "error", k)):
        ps = kinds[kind]
        lines += ["", f"## {kind} ({len(ps)}{', ERROR' if ps[0]['severity'] == 'error' else ''})", ""]
        lines += [f"- `{p['file']}`" + (f" [{p['entry']}]" if p["entry"] else "") + f": {p['reason']}" for p in ps]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ split
def split_catalog(catalog: Path, parts: int, out_dir: Path) -> list[Path]:
    """Split a catalog into `parts` files out_dir/part-000.jsonl ... balanced by image count (greedy:
    largest entry first onto the lightest part; ties by catalog order and part number, so deterministic).
    Each part keeps catalog order; paths are rewritten relative to out_dir.

    The parts are for data-parallel sharding (each rank or job reads its part) and for splitting an
    evaluation. They are NOT for making one protected model per part: protection must be implanted for
    the whole catalog in one model, since every released model must refuse every protected subject."""
    from train.catalog import list_images, load_catalog, write_catalog

    catalog, out_dir = Path(catalog), Path(out_dir)
    entries = load_catalog(catalog)
    if not 1 <= parts <= len(entries):
        raise IngestError(f"{catalog}: cannot split {len(entries)} entries into {parts} non-empty parts")
    sizes = [len(list_images(e.images)) for e in entries]
    load = [0] * parts
    assign: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(entries)), key=lambda i: (-sizes[i], i)):
        p = min(range(parts), key=lambda q: (load[q], q))
        load[p] += sizes[i]
        assign[p].append(i)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir.resolve()

    def rel(p):
        return None if p is None else os.path.relpath(Path(p).resolve(), base)

    paths = []
    for p, members in enumerate(assign):
        rows = []
        for i in sorted(members):
            e = entries[i]
            target = dict(e.target) if e.target else e.target
            for key in _TARGET_PATH_KEYS:
                if target and isinstance(target.get(key), str) and not Path(target[key]).is_absolute():
                    target[key] = rel(e.catalog_dir / target[key])
            row = {"id": e.id, "class": e.cls, "images": rel(e.images), "protected": e.protected,
                   "objective": e.objective, "target": target}
            for key in ("reference", "backgrounds"):
                if getattr(e, key) is not None:
                    row[key] = rel(getattr(e, key))
            rows.append({**row, **e.extra})
        path = out_dir / f"part-{p:03d}.jsonl"
        write_catalog(rows, path)
        paths.append(path)
    for stale in sorted(out_dir.glob("part-*.jsonl")):
        if stale not in paths:
            stale.unlink()               # an earlier split into more parts
    return paths
