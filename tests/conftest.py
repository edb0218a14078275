"""Shared fixtures: small catalogs of the embedded world, rendered once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def world_catalog(tmp_path_factory) -> Path:
    """Two persons and one cat of the `catalog` split: 5 images and 8 held-out references each."""
    from tools import world
    from train.catalog import write_catalog

    out = tmp_path_factory.mktemp("world")
    entries = world.generate(out, split="catalog", per_class=2, classes=("person",), progress=False)
    entries += world.generate(out, split="catalog", per_class=1, classes=("cat",), progress=False)
    write_catalog(entries, out / "catalog.jsonl")
    return out / "catalog.jsonl"
