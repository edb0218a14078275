import json

import numpy as np
import pytest
from PIL import Image

from tools import shards, world
from train.data import ShardError, expand_shards, image_caption_dataset


def test_world_shards_round_trip(tmp_path):
    paths = shards.write_shards(shards.world_samples("pretrain", per_class=2, views=2, seed=0), tmp_path,
                                prefix="ret", maxcount=5)
    assert len(paths) == 3  # 12 samples, 5 per shard
    rows = list(image_caption_dataset(tmp_path))
    assert len(rows) == 12
    image, caption, meta = rows[0]
    ident = world.identity(meta["class"], "pretrain", int(meta["identity"].split("-")[-1]))
    expected = np.asarray(world.render(ident, meta["view"])[0])
    assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)
    assert caption == world.caption(ident, meta["view"])
    # shuffled reading returns the same multiset
    keys = sorted(m["identity"] + str(m["view"]) for _, _, m in image_caption_dataset(tmp_path, shuffle=8, seed=1))
    assert keys == sorted(m["identity"] + str(m["view"]) for _, _, m in rows)


def test_folder_source_with_txt_and_json_captions(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(src / "a.png")
    (src / "a.txt").write_text("a red square\n")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(src / "sub" / "b.jpg")
    (src / "sub" / "b.json").write_text(json.dumps({"caption": "a blue square"}))
    shards.write_shards(shards.folder_samples(src), tmp_path / "out")
    rows = {cap: img for img, cap, _ in image_caption_dataset(tmp_path / "out")}
    assert set(rows) == {"a red square", "a blue square"}
    assert rows["a red square"][0].mean() > 0.99 and rows["a blue square"].shape == (3, 32, 32)


def test_folder_source_reports_every_problem(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "nocap.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(shards.ShardSourceError) as e:
        list(shards.folder_samples(tmp_path))
    assert "nocap.png: no caption" in str(e.value) and "bad.png: unreadable image" in str(e.value)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="no shards found"):
        expand_shards(tmp_path)
    with pytest.raises(ShardError, match="missing shard"):
        expand_shards(str(tmp_path / "x-{000000..000001}.tar"))


def test_committed_retention_shards_are_readable():
    from tests.conftest import REPO

    rows = list(image_caption_dataset(REPO / "shards" / "retention"))
    assert len(rows) >= 300
    assert {m["split"] for _, _, m in rows} == {"pretrain"}
    assert {m["class"] for _, _, m in rows} == set(world.CLASSES)


def _numbered_shards(folder, n_samples: int, per_shard: int):
    image = shards._png(Image.new("RGB", (8, 8), (0, 128, 0)))
    samples = ({"__key__": f"s{i:04d}", "png": image, "txt": f"sample {i}", "json": json.dumps({"i": i})}
               for i in range(n_samples))
    return shards.write_shards(samples, folder, prefix="num", maxcount=per_shard)


@pytest.mark.parametrize("n_shards", [8, 2])   # whole shards per part / every P-th sample (fewer shards than parts)
def test_parts_cover_every_sample_exactly_once(tmp_path, n_shards):
    _numbered_shards(tmp_path, 24, 24 // n_shards)
    parts = [[cap for _, cap, _ in image_caption_dataset(tmp_path, shuffle=8, seed=3, part=p, parts=4)] for p in range(4)]
    flat = [c for part in parts for c in part]
    assert sorted(flat) == sorted(f"sample {i}" for i in range(24)) and all(parts)


def test_retention_streams_split_over_ranks_and_workers_and_resume_in_place(tmp_path):
    from train.data import retention_batches

    _numbered_shards(tmp_path, 24, 3)   # 8 shards: 2 streams x 2 workers, 2 shards (6 samples) each
    epoch = []
    for stream in range(2):
        it = retention_batches(tmp_path, batch=3, stream=stream, streams=2, seed=0, workers=2)
        epoch += [c for _ in range(4) for c in next(it)[1]]   # 2 workers x 2 batches: one epoch of this stream
    assert sorted(epoch) == sorted(f"sample {i}" for i in range(24))   # no sample seen by two ranks/workers
    fresh = retention_batches(tmp_path, batch=3, stream=1, streams=2, seed=0, workers=2)
    expected = [next(fresh)[1] for _ in range(5)][2:]
    resumed = retention_batches(tmp_path, batch=3, stream=1, streams=2, seed=0, workers=2, skip=2)
    assert [next(resumed)[1] for _ in range(3)] == expected
