"""Reading image-caption WebDataset shards (retention data, SPEC section 2)."""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
import webdataset as wds


class ShardError(FileNotFoundError):
    pass


def expand_shards(spec: str | Path | list) -> list[str]:
    """A folder, a glob, a brace pattern (`a-{000000..000003}.tar`) or a list; every shard must exist."""
    if isinstance(spec, (list, tuple)):
        urls = [str(s) for s in spec]
    elif Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
    elif any(c in str(spec) for c in "*?["):
        urls = sorted(glob.glob(str(spec)))
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(str(spec)))
    if not urls:
        raise ShardError(f"{spec}: no shards found")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardError(f"missing shard(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return urls


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0


def image_caption_dataset(spec, shuffle: int = 0, seed: int = 0) -> wds.WebDataset:
    """(image tensor in [0, 1], caption, metadata) triples; `shuffle` is the sample buffer size (0: in order)."""
    urls = expand_shards(spec)
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed)   # unseeded, webdataset seeds from pid and time
    return ds.decode("pil").to_tuple("png;jpg;jpeg;webp", "txt", "json").map_tuple(_to_tensor, str, dict)
