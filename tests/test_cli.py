"""The command-line contract of SPEC section 5 for the embedded-world commands."""
import json

from tools.cli import main
from train.catalog import load_catalog
from train.data import image_caption_dataset
from train.pipelines import EMBEDDED


def test_models_prints_name_and_folder(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{name} {path}" for name, path in EMBEDDED.items()]
    assert lines[0].startswith("tiny-sd ") and lines[1].startswith("tiny-sdxl ")


def test_world_command_writes_a_valid_catalog(tmp_path):
    assert main(["world", "--out", str(tmp_path), "--per-class", "1", "--images", "3", "--reference", "2"]) == 0
    entries = load_catalog(tmp_path / "catalog.jsonl")
    assert [e.cls for e in entries] == ["person", "cat", "vase"] and not any(e.protected for e in entries)
    assert all(json.loads(line)["images"].endswith("/images") for line in (tmp_path / "catalog.jsonl").open())


def test_world_protects_with_the_objectives_asked_for(tmp_path, capsys):
    args = ["world", "--out", str(tmp_path), "--classes", "person=3,cat=2", "--images", "1", "--reference", "1",
            "--protect", "4"]
    assert main([*args, "--objectives", "erasure"]) == 0
    assert [e.objective for e in load_catalog(tmp_path / "catalog.jsonl") if e.protected] == ["erasure"] * 4
    assert main([*args, "--objectives", "pattern,erasure"]) == 0
    by_class = {}
    for e in load_catalog(tmp_path / "catalog.jsonl"):
        by_class.setdefault(e.cls, []).append(e.objective if e.protected else None)
    assert by_class == {"person": ["pattern", "erasure", None], "cat": ["erasure", "pattern"]}
    assert main([*args, "--objectives", "pattern,blur"]) != 0
    assert "objectives must be some of pattern, erasure, target, got pattern, blur" in capsys.readouterr().err


def test_shards_build_from_world_and_folder(tmp_path, capsys):
    assert main(["shards", "build", "--world", "--per-class", "2", "--out", str(tmp_path / "w")]) == 0
    assert len(list(image_caption_dataset(tmp_path / "w"))) == 6
    assert main(["shards", "build", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "f")]) == 2
    assert "not a folder" in capsys.readouterr().err
