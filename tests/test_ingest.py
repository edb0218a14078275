"""`persguard catalog build` / `split` (tools/ingest.py) against planted problems (tools/messy_catalog.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.cli import main
from tools.ingest import IngestError, build_catalog, phash, split_catalog
from tools.messy_catalog import make_messy
from train.catalog import list_images, load_catalog
from train.data import image_caption_dataset

STATUS = {"ok": "ok", "empty_entry": "empty", "too_few_images": "too_few"}


def _build(src, out, **kw):
    return build_catalog(src, out, progress=False, workers=kw.pop("workers", 1), **kw)


def _scene(w=120, h=90, seed=0) -> Image.Image:
    """A picture with structure (distinct perceptual hashes for distinct seeds)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _entry(root: Path, name: str, n: int, seed: int, cls: str | None = "person") -> Path:
    folder = root / cls / name if cls else root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _scene(seed=seed * 100 + i).save(folder / f"{i:02d}.png")
    return folder


def _problems(summary, kind):
    return [p for p in summary["problems"] if p["kind"] == kind]


def check_against_truth(summary: dict, truth: dict) -> None:
    """Every planted problem reported, every good image kept, and no duplicate that was not planted."""
    root = Path(truth["root"])

    def rel(f):
        return Path(f).relative_to(root).as_posix()

    reported = {(rel(p["file"]), p["kind"]) for p in summary["problems"] if p["file"]}
    for f, kind in truth["bad_files"].items():
        assert (f, kind) in reported, f"{f}: {kind} not reported"
    within_files = {f for d in truth["within_duplicates"] for f in d["files"]}
    dropped = {rel(p["file"]) for p in summary["problems"]
               if p["kind"] in ("duplicate_within", "empty_file", "unreadable", "too_small", "unsupported")}
    assert dropped <= set(truth["bad_files"]) | within_files, f"good files dropped: {dropped - set(truth['bad_files'])}"

    for eid, t in truth["entries"].items():
        s = summary["entries"][eid]
        assert s["status"] == STATUS[t["status"]], eid
        if t["status"] != "ok":
            assert eid in summary["excluded_entries"]
            assert any(p["entry"] == eid for p in _problems(summary, t["status"]))
            continue
        kept = [rel(src) for _, src in s["images"]]
        assert len(kept) == len(set(kept))
        assert set(t["good"]) <= set(kept), f"{eid}: good images missing {set(t['good']) - set(kept)}"
        assert set(kept) - set(t["good"]) <= within_files
    for d in truth["within_duplicates"]:
        kept = {rel(src) for _, src in summary["entries"][d["entry"]]["images"]}
        assert len(kept & set(d["files"])) == 1, d
        (gone,) = set(d["files"]) - kept
        assert (gone, "duplicate_within") in reported

    planted = {frozenset({(a, fa), (b, fb)}) for (a, b), (fa, fb) in
               ((d["entries"], d["files"]) for d in truth["across_duplicates"])}
    found = {frozenset({(a, rel(fa)), (b, rel(fb))}) for (a, b), (fa, fb) in
             ((d["entries"], d["files"]) for d in summary["cross_entry_duplicates"])}
    assert found == planted
    flagged = {e for d in truth["across_duplicates"] for e in d["entries"]}
    assert set(summary["flagged_entries"]) == flagged

    entries = load_catalog(Path(summary["catalog"]))
    assert {e.id for e in entries} == {k for k, t in truth["entries"].items() if t["status"] == "ok"}
    for e in entries:
        assert e.cls == truth["entries"][e.id]["class"]
        assert e.protected == truth["entries"][e.id]["protected"]
        assert ("review" in e.extra) == (e.id in flagged)
        assert len(list_images(e.images)) == len(summary["entries"][e.id]["images"])
    conv, planted_n = summary["conversions"], truth["planted"]
    assert conv.get("CMYK -> RGB", 0) == planted_n.get("cmyk", 0)
    assert conv.get("EXIF orientation applied", 0) == planted_n.get("exif_rotated", 0)
    assert conv.get("RGBA -> RGB", 0) == planted_n.get("alpha_png", 0)
    assert conv.get("I;16 -> RGB", 0) == planted_n.get("gray16", 0)
    assert conv.get("P -> RGB", 0) == planted_n.get("palette", 0)
    assert conv.get("L -> RGB", 0) == planted_n.get("grayscale", 0)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    truth = make_messy(root / "src", 30, seed=3)
    summary = _build(root / "src", root / "out", workers=2)
    return truth, summary, root / "out"


def test_messy_catalog_every_problem_reported_and_nothing_good_dropped(messy):
    truth, summary, out = messy
    planted = truth["planted"]
    for kind in ("truncated_jpeg", "random_bytes", "zero_byte", "tiny", "huge", "cmyk", "exif_rotated", "alpha_png",
                 "grayscale", "gray16", "palette", "within_exact", "within_near", "across_exact", "across_near",
                 "empty", "too_few", "non_image_file", "protected_json"):
        assert planted.get(kind, 0) >= 1, f"the messy catalog planted no {kind}"
    check_against_truth(summary, truth)
    assert summary["counts"]["errors"] == 0
    text = (out / "summary.md").read_text()
    for needle in ("Same picture under two ids", "## unreadable", "## too_small", "## empty_file",
                   "## too_few_images", "## empty_entry"):
        assert needle in text
    assert json.loads((out / "summary.json").read_text())["counts"] == summary["counts"]


def test_shards_hold_every_kept_image_keyed_by_entry(messy):
    _, summary, out = messy
    rows = list(image_caption_dataset(out / "shards"))
    assert len(rows) == summary["counts"]["images_kept"]
    assert sorted(Path(p).name for p in summary["shards"]) == sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert all(Path(p).name.startswith("catalog-") for p in summary["shards"])
    image, caption, meta = rows[0]
    png = out / "images" / meta["id"] / f"{meta['index']:03d}.png"
    assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), np.asarray(Image.open(png)))
    assert caption == f"a photo of a {meta['class']}" and image.shape == (3, 64, 64)
    import webdataset as wds

    keys = [s["__key__"] for s in wds.WebDataset(summary["shards"], shardshuffle=False, empty_check=False)]
    assert keys[0] == f"{meta['id']}/000" and len(set(keys)) == len(keys)


def test_exif_orientation_is_applied(tmp_path):
    # upright: left half red, right half blue; stored turned 90 degrees counter-clockwise with orientation 6
    upright = np.zeros((120, 160, 3), np.uint8)
    upright[:, :80] = (255, 0, 0)
    upright[:, 80:] = (0, 0, 255)
    folder = _entry(tmp_path / "src", "rot", 3, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(folder / "zz_rotated.jpg", quality=95, exif=exif)
    s = _build(tmp_path / "src", tmp_path / "out")
    (out_png, _), = [x for x in s["entries"]["rot"]["images"] if x[1].endswith("zz_rotated.jpg")]
    px = np.asarray(Image.open(tmp_path / "out" / out_png)).astype(int)
    assert px[32, 4, 0] > 200 and px[32, 4, 2] < 60      # left is red
    assert px[32, 59, 2] > 200 and px[32, 59, 0] < 60    # right is blue
    assert px[2, 4, 0] > 200 and px[61, 4, 0] > 200      # not turned: red top to bottom on the left
    assert s["conversions"]["EXIF orientation applied"] == 1


def test_modes_are_converted_not_dropped(tmp_path):
    folder = _entry(tmp_path / "src", "modes", 0, seed=0)
    Image.new("CMYK", (80, 80), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)         # red
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[:, :40] = (0, 128, 0, 255)                                                                # opaque green
    Image.fromarray(rgba).save(folder / "alpha.png")                                               # right: transparent
    Image.fromarray(np.full((80, 80), 32896, np.uint16)).save(folder / "gray16.png")             # mid gray, 16 bit
    Image.new("LA", (80, 80), (10, 255)).save(folder / "la.png")
    Image.new("P", (80, 80), 3).save(folder / "pal.png")
    Image.new("LAB", (80, 80), (128, 128, 128)).save(folder / "lab.tif")                        # mid gray
    Image.new("CMYK", (80, 80), (255, 0, 255, 0)).save(folder / "icc.jpg", icc_profile=b"not a profile")  # green
    s = _build(tmp_path / "src", tmp_path / "out", near_dup_bits=-1)
    assert s["counts"]["images_kept"] == 7 and s["counts"]["images_dropped"] == 0
    out = {Path(src).name: np.asarray(Image.open(tmp_path / "out" / o)).astype(int) for o, src in
           s["entries"]["modes"]["images"]}
    assert all(a.shape == (64, 64, 3) for a in out.values())
    assert out["cmyk.jpg"][32, 32, 0] > 200 and out["cmyk.jpg"][32, 32, 1:].max() < 60
    assert tuple(out["alpha.png"][32, 60]) == (255, 255, 255)       # transparent flattened on white
    assert tuple(out["alpha.png"][32, 4]) == (0, 128, 0)
    assert abs(out["gray16.png"][32, 32] - 128).max() <= 1            # scaled, not clipped to white
    assert abs(out["lab.tif"][32, 32] - 119).max() <= 3                 # L=50%: sRGB gray, not raw bytes
    assert out["icc.jpg"][32, 32, 1] > 200 and out["icc.jpg"][32, 32, [0, 2]].max() < 60  # bad profile: naive formula
    assert set(s["conversions"]) >= {"CMYK -> RGB", "RGBA -> RGB", "I;16 -> RGB", "LA -> RGB", "P -> RGB"}


def test_bad_files_are_dropped_and_named(tmp_path):
    folder = _entry(tmp_path / "src", "alice", 3, seed=2)
    data = (folder / "00.png").read_bytes()
    _scene(seed=77).save(folder / "tmp.jpg", quality=90)
    jpg = (folder / "tmp.jpg").read_bytes()
    (folder / "tmp.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (folder / "zero.jpg").write_bytes(b"")
    _scene(16, 16, seed=5).save(folder / "tiny.png")
    (folder / "Thumbs.db").write_bytes(b"x")
    s = _build(tmp_path / "src", tmp_path / "out")
    by_file = {Path(p["file"]).name: p for p in s["problems"]}
    assert by_file["truncated.jpg"]["kind"] == "unreadable" and "truncated" in by_file["truncated.jpg"]["reason"]
    assert by_file["cut.png"]["kind"] == "unreadable"
    assert by_file["noise.jpg"]["kind"] == "unreadable" and "cannot identify" in by_file["noise.jpg"]["reason"]
    assert by_file["zero.jpg"]["kind"] == "empty_file"
    assert by_file["tiny.png"]["kind"] == "too_small" and "16x16" in by_file["tiny.png"]["reason"]
    assert by_file["Thumbs.db"]["kind"] == "ignored_file"
    assert all(p["entry"] == "alice" for p in s["problems"])
    assert s["counts"]["images_kept"] == 3 and s["counts"]["images_dropped"] == 5
    assert [Path(src).name for _, src in s["entries"]["alice"]["images"]] == ["00.png", "01.png", "02.png"]


def test_duplicates_within_and_across_entries(tmp_path):
    src = tmp_path / "src"
    a = _entry(src, "alice", 4, seed=3)
    b = _entry(src, "bob", 3, seed=4)
    big = _scene(240, 180, seed=300)
    big.save(a / "00.png")                                              # the largest copy: it must survive
    big.resize((120, 90), Image.LANCZOS).save(a / "00_small.jpg", quality=80)   # near copy inside alice
    (a / "01_again.png").write_bytes((a / "01.png").read_bytes())      # exact copy inside alice
    (b / "from_alice.png").write_bytes((a / "02.png").read_bytes())    # alice's picture under bob
    big.resize((200, 150), Image.BICUBIC).save(b / "resized_alice.jpg", quality=85)
    s = _build(src, tmp_path / "out")
    within = {Path(p["file"]).name: p for p in _problems(s, "duplicate_within")}
    assert set(within) == {"00_small.jpg", "01_again.png"}
    assert within["00_small.jpg"]["match"] == "near" and within["01_again.png"]["match"] == "exact"
    assert Path(within["00_small.jpg"]["kept"]).name == "00.png"
    cross = {(tuple(d["entries"]), Path(d["files"][1]).name, d["match"]) for d in s["cross_entry_duplicates"]}
    assert cross == {(("alice", "bob"), "from_alice.png", "exact"), (("alice", "bob"), "resized_alice.jpg", "near")}
    entries = {e.id: e for e in load_catalog(tmp_path / "out" / "catalog.jsonl")}
    assert set(entries) == {"alice", "bob"}                             # neither silently dropped
    assert len(list_images(entries["alice"].images)) == 4 and len(list_images(entries["bob"].images)) == 5
    assert "bob" in entries["alice"].extra["review"][0] and "alice" in entries["bob"].extra["review"][0]
    assert set(s["flagged_entries"]) == {"alice", "bob"}


def test_phash_is_stable_under_resizing_and_distinct_across_pictures():
    def h(im):   # as in the builder: the hash of the normalized 64x64 image
        return phash(im.resize((64, 64), Image.LANCZOS))

    for seed in range(10, 15):
        a = _scene(256, 256, seed=seed)
        for copy in (a.resize((100, 100), Image.LANCZOS), a.resize((400, 400), Image.BICUBIC)):
            assert bin(h(a) ^ h(copy)).count("1") <= 2
        others = [bin(h(a) ^ h(_scene(256, 256, seed=s))).count("1") for s in range(100, 120)]
        assert min(others) > 8


def test_too_few_images_and_empty_folders_are_excluded(tmp_path):
    src = tmp_path / "src"
    _entry(src, "ok", 3, seed=5)
    few = _entry(src, "few", 2, seed=6)
    (few / "bad.jpg").write_bytes(b"not an image")
    (src / "person" / "nothing").mkdir()
    (src / "lonely").mkdir()                                            # an empty top-level folder
    s = _build(src, tmp_path / "out")
    assert s["excluded_entries"].keys() == {"few", "nothing", "lonely"}
    assert {p["entry"] for p in _problems(s, "empty_entry")} == {"nothing", "lonely"}
    (p,) = _problems(s, "too_few_images")
    assert p["entry"] == "few" and "2 usable image(s) of 3 file(s)" in p["reason"]
    assert [e.id for e in load_catalog(tmp_path / "out" / "catalog.jsonl")] == ["ok"]


def test_flat_layout_classes_and_entry_json(tmp_path):
    src = tmp_path / "src"
    _entry(src, "anna", 3, seed=7, cls=None)
    cat = _entry(src, "tom", 3, seed=8, cls=None)
    (cat / "entry.json").write_text(json.dumps({"class": "cat", "protected": True, "objective": "erasure",
                                                "note": "kept"}))
    bad = _entry(src, "zed", 3, seed=9, cls=None)
    (bad / "entry.json").write_text(json.dumps({"protected": True}))
    broken = _entry(src, "yan", 3, seed=10, cls=None)
    (broken / "entry.json").write_text("{oops")
    s = _build(src, tmp_path / "out", cls="person")
    entries = {e.id: e for e in load_catalog(tmp_path / "out" / "catalog.jsonl")}
    assert set(entries) == {"anna", "tom"}
    assert entries["anna"].cls == "person" and entries["tom"].cls == "cat"
    assert entries["tom"].protected and entries["tom"].objective == "erasure" and entries["tom"].extra == {"note": "kept"}
    errors = {p["entry"]: p for p in s["problems"] if p["severity"] == "error"}
    assert "needs an objective" in errors["zed"]["reason"] and errors["zed"]["file"].endswith("zed/entry.json")
    assert "not valid JSON" in errors["yan"]["reason"]
    # without --class an entry naming no class is an error, not a guess
    s = _build(src, tmp_path / "out2")
    assert "no class" in next(p["reason"] for p in s["problems"] if p["entry"] == "anna")


def test_same_id_in_two_class_folders_is_an_error(tmp_path):
    src = tmp_path / "src"
    _entry(src, "alex", 3, seed=11, cls="person")
    _entry(src, "alex", 3, seed=12, cls="cat")
    _entry(src, "kim", 3, seed=13, cls="cat")
    s = _build(src, tmp_path / "out")
    dups = _problems(s, "duplicate_id")
    assert len(dups) == 2 and all(p["severity"] == "error" for p in dups)
    assert any("cat/alex" in p["reason"] for p in dups) and any("person/alex" in p["reason"] for p in dups)
    assert [e.id for e in load_catalog(tmp_path / "out" / "catalog.jsonl")] == ["kim"]


def test_csv_source_and_duplicate_ids_with_line_numbers(tmp_path, capsys):
    imgs = tmp_path / "data" / "imgs"
    imgs.mkdir(parents=True)
    for i in range(10):
        _scene(seed=500 + i).save(imgs / f"{i}.png")
    _entry(tmp_path / "data", "folder_of_dan", 3, seed=14, cls=None)
    (tmp_path / "data" / "c.csv").write_text("\n".join([
        "id,class,image,protected,objective",
        "ann,person,imgs/0.png,true,pattern",         # 2
        "ann,person,imgs/1.png,true,pattern",         # 3
        "ann,person,imgs/2.png,true,pattern",         # 4
        "bo,person,imgs/3.png,,",                     # 5
        "bo,cat,imgs/4.png,,",                        # 6: bo defined differently
        "bo,person,imgs/5.png,,",                     # 7
        "cy,person,imgs/6.png,,",                     # 8
        "cy,person,imgs/missing.png,,",               # 9
        "cy,person,imgs/7.png,,",                     # 10
        "ann,person,imgs/8.png,true,pattern",         # 11: ann again, later: a warning
        ",person,imgs/0.png,,",                       # 12: no id
        "dan,person,folder_of_dan,,",                 # 13: a folder of images
        "cy,person,imgs/6.png,,",                     # 14: listed twice
        "cy,person,imgs/9.png,,",                     # 15
    ]) + "\n")
    s = _build(tmp_path / "data" / "c.csv", tmp_path / "out")
    (dup,) = _problems(s, "duplicate_id")
    assert dup["entry"] == "bo" and dup["lines"] == [5, 6, 7] and "lines 5,7" in dup["reason"] and "lines 6" in dup["reason"]
    assert dup["file"].endswith("c.csv:5-7")
    (row,) = _problems(s, "bad_row")
    assert row["line"] == 12 and row["file"].endswith("c.csv:12")
    (missing,) = _problems(s, "missing_file")
    assert missing["file"].endswith("missing.png") and missing["line"] == 9
    split = {p["entry"]: p for p in _problems(s, "split_id")}
    assert set(split) == {"ann", "cy"} and "2-4,11" in split["ann"]["reason"]
    assert {p["entry"] for p in _problems(s, "duplicate_row")} == {"cy"}
    entries = {e.id: e for e in load_catalog(tmp_path / "out" / "catalog.jsonl")}
    assert set(entries) == {"ann", "cy", "dan"}
    assert entries["ann"].protected and len(list_images(entries["ann"].images)) == 4
    assert len(list_images(entries["cy"].images)) == 3 and len(list_images(entries["dan"].images)) == 3
    # the CLI exits 1 when an entry has errors, after writing everything
    assert main(["catalog", "build", "--from", str(tmp_path / "data" / "c.csv"), "--out", str(tmp_path / "out")]) == 1
    assert "2 error(s)" in capsys.readouterr().out       # bo's two definitions and the row without id


def test_csv_without_required_columns(tmp_path):
    (tmp_path / "c.csv").write_text("name,image\nx,a.png\n")
    with pytest.raises(IngestError, match="missing column.*id.*class"):
        _build(tmp_path / "c.csv", tmp_path / "out")


def test_output_folder_safety_and_rebuild(tmp_path):
    src = tmp_path / "src"
    _entry(src, "ok", 3, seed=15)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("do not delete")
    with pytest.raises(IngestError, match="not empty"):
        _build(src, tmp_path / "busy")
    with pytest.raises(IngestError, match="inside the source"):
        _build(src, src / "out")
    _build(src, tmp_path / "out")
    _entry(src, "two", 3, seed=16)
    s = _build(src, tmp_path / "out")                                   # an earlier build is replaced
    assert s["counts"]["entries_valid"] == 2 and (tmp_path / "busy" / "mine.txt").exists()


def test_split_is_balanced_deterministic_and_loadable(messy, tmp_path):
    _, summary, out = messy
    catalog = Path(summary["catalog"])
    entries = load_catalog(catalog)
    sizes = {e.id: len(list_images(e.images)) for e in entries}
    paths = split_catalog(catalog, 4, tmp_path / "parts")
    assert [p.name for p in paths] == [f"part-{i:03d}.jsonl" for i in range(4)]
    parts = [load_catalog(p) for p in paths]                            # paths still resolve from the new folder
    ids = [e.id for part in parts for e in part]
    assert sorted(ids) == sorted(sizes) and len(ids) == len(set(ids))
    loads = [sum(sizes[e.id] for e in part) for part in parts]
    assert max(loads) - min(loads) <= max(sizes.values())
    order = [e.id for e in entries]
    assert all([e.id for e in part] == sorted((e.id for e in part), key=order.index) for part in parts)
    again = split_catalog(catalog, 4, tmp_path / "again")               # a sibling folder: same relative paths
    assert [p.read_text() for p in again] == [p.read_text() for p in paths]
    assert split_catalog.__doc__ and "NOT" in split_catalog.__doc__
    with pytest.raises(IngestError, match="non-empty parts"):
        split_catalog(catalog, len(entries) + 1, tmp_path / "x")


def test_cli_build_and_split(messy, tmp_path, capsys):
    truth, _, _ = messy
    assert main(["catalog", "build", "--from", truth["root"], "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "entries valid" in text and f"summary: {tmp_path / 'out' / 'summary.md'}" in text
    assert main(["catalog", "split", "--catalog", str(tmp_path / "out" / "catalog.jsonl"), "--parts", "2",
                 "--out", str(tmp_path / "parts")]) == 0
    assert capsys.readouterr().out.count("part-") == 2
    assert main(["catalog", "build", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


@pytest.mark.slow
def test_thousand_messy_entries(tmp_path):
    truth = make_messy(tmp_path / "src", 1000, seed=0)
    summary = _build(tmp_path / "src", tmp_path / "out", workers=None)
    check_against_truth(summary, truth)
    assert summary["counts"]["entries_found"] == 1000
    assert len(list(image_caption_dataset(tmp_path / "out" / "shards"))) == summary["counts"]["images_kept"]
