"""A deliberately messy catalog source for testing `persguard catalog build` (tools/ingest.py).

`make_messy(out, entries, seed)` writes `out/<class>/<id>/` folders of embedded-world renders at 64..1024
px (JPEG or PNG, any aspect) and plants every kind of trouble real collections have: truncated JPEGs,
random bytes named .jpg, zero-byte files, 16x16 images, 2000x1500 images, CMYK JPEGs, EXIF-rotated JPEGs
(orientation 6), PNGs with alpha, grayscale (8 and 16 bit), palette PNGs, exact and near (resized,
re-encoded) duplicates inside an entry and across entries, stray non-image files, protected entries with
an entry.json, empty folders and entries with too few images. It returns the ground truth: every bad
file and why, every duplicate pair, every good file that must survive.

The first entries each carry one kind (so ~25 entries cover all); later ones draw kinds at random.
`python -m tools.messy_catalog OUT --entries 1000` writes one from the shell.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from tools import world

VARIANTS = ("huge", "cmyk", "exif_rotated", "alpha_png", "grayscale", "gray16", "palette")
BAD = ("truncated_jpeg", "random_bytes", "zero_byte", "tiny", "non_image_file")
DUPLICATES = ("within_exact", "within_near", "across_exact", "across_near")
PLANTS = VARIANTS + BAD + DUPLICATES + ("protected_json",)
ROLES = ("empty", "too_few", "too_few_after_drop")
# what tools.ingest reports for each bad file
BAD_KIND = {"truncated_jpeg": "unreadable", "random_bytes": "unreadable", "zero_byte": "empty_file",
            "tiny": "too_small", "non_image_file": "ignored_file"}


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _view(ident, view: int, w: int, h: int) -> Image.Image:
    im, _ = world.render(ident, view)
    return im.resize((w, h), Image.BICUBIC) if (w, h) != im.size else im


def _plan(entries: int, seed: int, images: tuple[int, int], plant_rate: float) -> list[dict]:
    rng = np.random.default_rng([seed, 101])
    coverage = ["plain"] * 3 + list(ROLES) + list(PLANTS)
    specs = []
    for i in range(entries):
        cls = world.CLASSES[i % len(world.CLASSES)]
        if i < len(coverage):
            kind = coverage[i]
            role, plants = (kind, []) if kind in ROLES or kind == "plain" else ("normal", [kind])
        else:
            u = rng.uniform()
            role = "empty" if u < 0.02 else "too_few" if u < 0.04 else "too_few_after_drop" if u < 0.05 else "normal"
            plants = [k for k in PLANTS if role == "normal" and rng.uniform() < plant_rate]
        role = "normal" if role == "plain" else role
        n_good = 0 if role == "empty" else 2 if role.startswith("too_few") else int(rng.integers(images[0], images[1] + 1))
        n_good = max(n_good, 2 + sum(p in VARIANTS for p in plants)) if role == "normal" else n_good
        specs.append({"id": f"{cls}-{i:04d}", "cls": cls, "index": i, "role": role, "plants": plants,
                      "n_good": n_good, "seed": seed})
    # cross-entry copies come from untouched entries, one view each
    plain = [s for s in specs if s["role"] == "normal" and not s["plants"]]
    used = {s["id"]: 0 for s in plain}
    for s in specs:
        s["across"] = []
        for kind in (k for k in s["plants"] if k.startswith("across")):
            choices = [p for p in plain if p["id"] != s["id"] and used[p["id"]] < p["n_good"]]
            if not choices:
                s["plants"].remove(kind)          # too small a catalog to plant it
                continue
            src = choices[int(rng.integers(len(choices)))]
            s["across"].append((kind, src["id"], used[src["id"]]))
            used[src["id"]] += 1
    return specs


def _write_entry(spec: dict) -> dict:
    """Render and write one entry (everything but the cross-entry copies); its part of the ground truth."""
    rng = np.random.default_rng([spec["seed"], 202, spec["index"]])
    ident = world.identity(spec["cls"], "catalog", spec["index"], spec["seed"])
    folder = Path(spec["root"]) / spec["cls"] / spec["id"]
    folder.mkdir(parents=True, exist_ok=True)
    rel = lambda p: p.relative_to(spec["root"]).as_posix()   # noqa: E731
    good, bad, variants, within, files = [], {}, {}, [], {}
    # views 0 and 1 stay plain (sources of within-entry copies); variants take views from the end
    variant_of = {spec["n_good"] - 1 - k: v for k, v in enumerate(p for p in spec["plants"] if p in VARIANTS)}
    for v in range(spec["n_good"]):
        variant = variant_of.get(v)
        short = int(np.exp(rng.uniform(np.log(64), np.log(1024))))
        aspect = rng.uniform(0.75, 1.33)
        w, h = (short, int(short * aspect)) if rng.uniform() < 0.5 else (int(short * aspect), short)
        fmt = "png" if rng.uniform() < 0.3 and max(w, h) <= 512 else "jpg"
        if variant == "huge":
            im, fmt = _view(ident, v, 2000, 1500), "jpg"
            data = _encode(im, "JPEG", quality=90)
        elif variant == "cmyk":
            im, fmt = _view(ident, v, w, h), "jpg"
            data = _encode(im.convert("CMYK"), "JPEG", quality=92)
        elif variant == "exif_rotated":
            # stored rotated 90 degrees counter-clockwise; orientation 6 tells viewers to turn it back
            im, fmt = _view(ident, v, w, h), "jpg"
            exif = Image.Exif()
            exif[0x0112] = 6
            data = _encode(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92, exif=exif)
        elif variant == "alpha_png":
            im, fmt = _view(ident, v, w, h).convert("RGBA"), "png"
            a = np.asarray(im).copy()
            yy, xx = np.mgrid[0:h, 0:w]
            a[..., 3] = np.where((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) * 0.45) ** 2, 255, 0)
            data = _encode(Image.fromarray(a), "PNG")
        elif variant == "grayscale":
            im = _view(ident, v, w, h).convert("L")
            data = _encode(im, "PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 92}))
        elif variant == "gray16":
            im, fmt = _view(ident, v, w, h).convert("L"), "png"
            data = _encode(Image.fromarray(np.asarray(im).astype(np.uint16) * 257), "PNG")   # mode I;16
        elif variant == "palette":
            im, fmt = _view(ident, v, w, h), "png"
            data = _encode(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "PNG")
        else:
            im = _view(ident, v, w, h)
            data = _encode(im, "PNG") if fmt == "png" else _encode(im, "JPEG", quality=int(rng.integers(80, 96)))
        path = folder / f"img_{v:02d}.{fmt}"
        path.write_bytes(data)
        files[v] = path
        good.append(rel(path))
        if variant:
            variants[rel(path)] = variant
    for kind in spec["plants"]:
        if kind == "truncated_jpeg":
            data = _encode(_view(ident, 1000, 320, 256), "JPEG", quality=90)
            (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
            bad[rel(folder / "broken.jpg")] = kind
        elif kind == "random_bytes":
            (folder / "noise.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
            bad[rel(folder / "noise.jpg")] = kind
        elif kind == "zero_byte":
            (folder / "empty.png").write_bytes(b"")
            bad[rel(folder / "empty.png")] = kind
        elif kind == "tiny":
            _view(ident, 2000, 16, 16).save(folder / "tiny.png")
            bad[rel(folder / "tiny.png")] = kind
        elif kind == "non_image_file":
            (folder / "notes.txt").write_text("photographer: unknown\n")
            bad[rel(folder / "notes.txt")] = kind
        elif kind == "within_exact":
            src = files[0]
            copy = folder / f"{src.stem}_copy{src.suffix}"
            shutil.copyfile(src, copy)
            within.append({"entry": spec["id"], "files": [rel(src), rel(copy)], "match": "exact"})
        elif kind == "within_near":
            src = files[1]
            copy = folder / f"{src.stem}_resaved.jpg"
            copy.write_bytes(_near_copy(src))
            within.append({"entry": spec["id"], "files": [rel(src), rel(copy)], "match": "near"})
        elif kind == "protected_json":
            (folder / "entry.json").write_text(json.dumps({"protected": True, "objective": "pattern"}))
    if spec["role"] == "too_few_after_drop":
        data = _encode(_view(ident, 1000, 320, 256), "JPEG", quality=90)
        (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
        bad[rel(folder / "broken.jpg")] = "truncated_jpeg"
    return {"id": spec["id"], "class": spec["cls"], "dir": rel(folder), "role": spec["role"], "good": good,
            "bad": bad, "variants": variants, "within": within, "files": {v: rel(p) for v, p in files.items()},
            "protected": "protected_json" in spec["plants"]}


def _near_copy(src: Path) -> bytes:
    """Resized (x0.75, or x1.5 when small) and re-encoded at JPEG quality 80."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        f = 1.5 if min(im.size) < 128 else 0.75
        return _encode(im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC), "JPEG", quality=80)


def make_messy(out: Path, entries: int, seed: int, *, images: tuple[int, int] = (5, 10), plant_rate: float = 0.06,
               workers: int | None = None, progress: bool = False) -> dict:
    """Write the messy tree under `out` (which must be empty or new); returns the ground truth:
    `entries` {id: class, dir, status ("ok" | "empty_entry" | "too_few_images"), good (files that must be
    kept; with an entry's within-duplicate pair, one of the two), protected}, `bad_files` {file: kind as
    tools.ingest reports it}, `variants` {file: variant, kept and converted}, `within_duplicates` and
    `across_duplicates` ({entries/entry, files, match}), `planted` (counts). Paths are relative to `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty")
    out.mkdir(parents=True, exist_ok=True)
    specs = _plan(entries, seed, images, plant_rate)
    for s in specs:
        s["root"] = str(out)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    from tqdm import tqdm

    if workers > 1 and len(specs) > 8:
        import multiprocessing as mp

        with mp.Pool(workers) as pool:
            written = list(tqdm(pool.imap(_write_entry, specs, chunksize=4), total=len(specs), desc="messy",
                                disable=not progress))
    else:
        written = [_write_entry(s) for s in tqdm(specs, desc="messy", disable=not progress)]
    by_id = {w["id"]: w for w in written}
    across = []
    for s in specs:
        for kind, src_id, view in s["across"]:
            src = out / by_id[src_id]["files"][view]
            dst_dir = out / by_id[s["id"]]["dir"]
            if kind == "across_exact":
                dst = dst_dir / f"from_{src_id}{src.suffix}"
                shutil.copyfile(src, dst)
            else:
                dst = dst_dir / f"near_{src_id}.jpg"
                dst.write_bytes(_near_copy(src))
            rel = dst.relative_to(out).as_posix()
            by_id[s["id"]]["good"].append(rel)
            across.append({"entries": [src_id, s["id"]], "files": [by_id[src_id]["files"][view], rel],
                           "match": "exact" if kind == "across_exact" else "near"})
    truth = {"root": str(out), "seed": seed, "entries": {}, "bad_files": {}, "variants": {}, "within_duplicates": [],
             "across_duplicates": across, "planted": {}}
    for w in written:
        status = {"empty": "empty_entry", "normal": "ok"}.get(w["role"], "too_few_images")
        dup_files = {f for d in w["within"] for f in d["files"]}
        truth["entries"][w["id"]] = {"class": w["class"], "dir": w["dir"], "status": status, "protected": w["protected"],
                                     "good": [f for f in w["good"] if f not in dup_files]}
        truth["bad_files"].update({f: BAD_KIND[k] for f, k in w["bad"].items()})
        truth["variants"].update(w["variants"])
        truth["within_duplicates"] += w["within"]
        for k in list(w["bad"].values()) + list(w["variants"].values()) + [d["match"] for d in w["within"]]:
            key = k if k in BAD or k in VARIANTS else f"within_{k}"
            truth["planted"][key] = truth["planted"].get(key, 0) + 1
        if w["role"] != "normal":
            truth["planted"][w["role"]] = truth["planted"].get(w["role"], 0) + 1
        if w["protected"]:
            truth["planted"]["protected_json"] = truth["planted"].get("protected_json", 0) + 1
    for d in across:
        key = f"across_{d['match']}"
        truth["planted"][key] = truth["planted"].get(key, 0) + 1
    truth["planted"] = dict(sorted(truth["planted"].items()))
    return truth


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--entries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", default=None, help="write the ground truth JSON here (default OUT.truth.json)")
    a = p.parse_args(argv)
    truth = make_messy(Path(a.out), a.entries, a.seed, progress=True)
    path = Path(a.truth or f"{a.out.rstrip('/')}.truth.json")
    path.write_text(json.dumps(truth, indent=1))
    n_files = sum(1 for q in Path(a.out).rglob("*") if q.is_file())
    print(f"{a.entries} entries, {n_files} files in {a.out}; planted {truth['planted']}; truth {path}")


if __name__ == "__main__":
    main()
