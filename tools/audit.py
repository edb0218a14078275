"""`persguard audit DIR --catalog FILE`: the released folder holds the pipeline and nothing of the catalog.

Run at the end of every `persguard protect` and on demand. A leak is any of:
- a file that is not part of a diffusers pipeline folder (an image, a JSONL, a checkpoint, a log ...);
- an entry id, a catalog path or the catalog's file name inside any file;
- the bytes of any catalog image (whole-file hash, or a 64-byte run from inside the file) inside any file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from train.catalog import Entry, list_images, load_catalog

PIPELINE_SUFFIXES = {".json", ".safetensors", ".txt", ".bin", ".model"}   # configs, weights, tokenizer files
PROBE = 64
SCAN_WEIGHTS_UP_TO = 256 << 20   # byte-run search inside weight files up to this size (SDXL-scale: header only)


def _catalog_strings(catalog: Path, entries: list[Entry]) -> set[str]:
    strings = {catalog.name}
    for e in entries:
        strings.add(e.id)
        for folder in (e.images, e.reference_dir, e.backgrounds):
            if folder is not None:
                strings.add(str(folder))
    return {s for s in strings if len(s) >= 4}


def _image_probes(entries: list[Entry]) -> tuple[set[str], dict[bytes, str]]:
    hashes, runs = set(), {}
    for e in entries:
        for folder in (e.images, e.reference_dir, e.backgrounds):
            if folder is None or not Path(folder).is_dir():
                continue
            for path in list_images(Path(folder)):
                data = path.read_bytes()
                hashes.add(hashlib.sha256(data).hexdigest())
                if len(data) > 4 * PROBE:   # a run from the middle: past headers every PNG/JPEG shares
                    mid = len(data) // 2
                    runs[data[mid:mid + PROBE]] = f"{e.id}/{path.name}"
    return hashes, runs


def audit(folder: Path, catalog: Path) -> list[str]:
    """Problems found (empty: clean)."""
    folder, catalog = Path(folder), Path(catalog)
    if not (folder / "model_index.json").is_file():
        return [f"{folder}: not a diffusers pipeline folder (no model_index.json)"]
    entries = load_catalog(catalog)
    strings = _catalog_strings(catalog, entries)
    hashes, runs = _image_probes(entries)
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if path.suffix not in PIPELINE_SUFFIXES:
            problems.append(f"{rel}: not a pipeline file")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() in hashes:
            problems.append(f"{rel}: is a catalog image")
            continue
        text = data.decode("utf-8", errors="ignore") if path.suffix != ".safetensors" else data[:1 << 16].decode(
            "utf-8", errors="ignore")  # safetensors: only the JSON header holds names
        problems += [f"{rel}: contains catalog string {s!r}" for s in sorted(strings) if s in text]
        if path.suffix != ".safetensors" or len(data) <= SCAN_WEIGHTS_UP_TO:
            problems += [f"{rel}: contains bytes of catalog image {name}" for run, name in runs.items() if run in data]
    return problems
