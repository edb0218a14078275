import json
from pathlib import Path

import pytest

from train.catalog import CatalogError, find_entry, load_catalog, load_images


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_loads_the_world_catalog(world_catalog):
    entries = load_catalog(world_catalog)
    assert [e.cls for e in entries] == ["person", "person", "cat"]
    assert load_images(entries[0].images, 64).shape == (5, 3, 64, 64)
    assert find_entry(entries, entries[2].id).cls == "cat"


def test_every_problem_is_reported_with_file_and_line(tmp_path, world_catalog):
    good = json.loads(world_catalog.read_text().splitlines()[0])
    good["images"] = str(world_catalog.parent / good["images"])
    good.pop("reference"), good.pop("backgrounds")
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "c.jsonl", [
        good,
        {**good},                                             # 2: duplicate id
        {**good, "id": "b", "images": str(tmp_path / "empty")},  # 3: empty folder
        "{not json",                                          # 4
        {**good, "id": "", "objective": "nonsense"},          # 5
        {**good, "id": "c", "protected": True},               # 6: protected without objective
        {**good, "id": "d", "protected": True, "objective": "target",   # 7: substitute twins missing
         "target": {"images": good["images"], "backgrounds": str(tmp_path / "gone")}},
    ])
    with pytest.raises(CatalogError) as e:
        load_catalog(tmp_path / "c.jsonl")
    msg = str(e.value)
    for needle in ["c.jsonl:2: duplicate id", "c.jsonl:3: images:", "no images", "c.jsonl:4: not valid JSON",
                   "c.jsonl:5: missing or empty 'id'", "objective 'nonsense'", "c.jsonl:6: a protected entry needs",
                   "c.jsonl:7: target.backgrounds:"]:
        assert needle in msg, needle


def test_missing_and_empty_catalog(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(CatalogError, match="no entries"):
        load_catalog(tmp_path / "e.jsonl")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CatalogError, match="broken.png: unreadable image"):
        load_images(tmp_path / "imgs", 64)


def test_unknown_entry_id(world_catalog):
    with pytest.raises(CatalogError, match="unknown entry id 'ghost'"):
        find_entry(load_catalog(world_catalog), "ghost", world_catalog)


def test_an_entry_written_elsewhere_keeps_its_substitute(tmp_path, world_catalog):
    import shutil

    from train.catalog import write_catalog

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    shutil.copytree(rows[1]["images"], tmp_path / "sub" / "images")   # a substitute beside the catalog, relative
    rows[0].update(protected=True, objective="target", target={"images": "sub/images"})
    write_catalog(rows, tmp_path / "catalog.jsonl")
    entry = load_catalog(tmp_path / "catalog.jsonl")[0]
    (tmp_path / "elsewhere").mkdir()
    write_catalog([entry.to_json()], tmp_path / "elsewhere" / "catalog.jsonl")
    copy = load_catalog(tmp_path / "elsewhere" / "catalog.jsonl")[0]
    assert Path(copy.target["images"]).resolve() == (tmp_path / "sub" / "images").resolve()


def test_an_entry_of_a_catalog_loaded_by_a_relative_path_written_elsewhere_keeps_its_folders(tmp_path, world_catalog,
                                                                                            monkeypatch):
    import shutil

    from train.catalog import write_catalog

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    shutil.copytree(rows[1]["images"], tmp_path / "run" / "sub" / "images")
    rows[0].update(protected=True, objective="target", target={"images": "sub/images"})
    write_catalog(rows[:1], tmp_path / "run" / "catalog.jsonl")
    monkeypatch.chdir(tmp_path)
    entry = load_catalog(Path("run/catalog.jsonl"))[0]        # as `persguard aspl --catalog run/catalog.jsonl` does
    (tmp_path / "run" / "aspl").mkdir()
    write_catalog([entry.to_json()], tmp_path / "run" / "aspl" / "catalog.jsonl")
    copy = load_catalog(tmp_path / "run" / "aspl" / "catalog.jsonl")[0]
    assert Path(copy.target["images"]).resolve() == (tmp_path / "run" / "sub" / "images").resolve()
    assert copy.images.resolve() == Path(rows[0]["images"]).resolve()
