"""`persguard audit`: a released folder passes only when it holds nothing of the catalog."""
import shutil

import pytest

from tools.audit import audit
from tools.cli import main
from train.catalog import list_images, load_catalog
from train.pipelines import EMBEDDED


@pytest.fixture()
def release(tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(EMBEDDED["tiny-sd"], folder)
    return folder


def test_a_clean_pipeline_passes(release, world_catalog, capsys):
    assert audit(release, world_catalog) == []
    assert main(["audit", str(release), "--catalog", str(world_catalog)]) == 0
    assert "audit passed" in capsys.readouterr().out


def test_each_kind_of_planted_leak_fails(release, world_catalog, capsys):
    entry = load_catalog(world_catalog)[0]
    image = list_images(entry.images)[0]

    shutil.copy(image, release / "unet" / "note.png")                      # a catalog image as a file
    (release / "scheduler" / "extra.json").write_text(f'{{"who": "{entry.id}"}}')  # an entry id
    data = image.read_bytes()
    (release / "text_encoder" / "blob.bin").write_bytes(b"\0" * 100 + data[10:] + b"\0")  # image bytes inside
    problems = audit(release, world_catalog)
    assert any("unet/note.png: not a pipeline file" in p for p in problems)
    assert any("unet/note.png: is a catalog image" in p for p in problems)
    assert any(f"contains catalog string {entry.id!r}" in p for p in problems)
    assert any("text_encoder/blob.bin: contains bytes of catalog image" in p for p in problems)
    assert main(["audit", str(release), "--catalog", str(world_catalog)]) == 1
    assert "audit FAILED" in capsys.readouterr().out


def test_a_folder_that_is_not_a_pipeline_is_reported(tmp_path, world_catalog):
    assert "not a diffusers pipeline folder" in audit(tmp_path, world_catalog)[0]
