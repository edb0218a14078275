"""Reading image-caption WebDataset shards (retention data, SPEC section 2), split for data parallelism.

A job reads `streams` disjoint streams (one per micro-batch of a step: world size x grad_accum), and a
stream may be read by several DataLoader workers. Stream s, worker w reads part p = s * W + w of
P = streams * W parts: whole shards `urls[p::P]` when there are at least P shards (each worker decodes
only its own), else every P-th sample of the shared order (tiny datasets). No sample is seen by two
parts in an epoch; each part reshuffles per epoch from (seed, part, epoch); the position is a batch
count, so a resumed job skips exactly what it had consumed.
"""
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


def image_caption_dataset(spec, shuffle: int = 0, seed: int = 0, part: int = 0, parts: int = 1) -> wds.WebDataset:
    """(image tensor in [0, 1], caption, metadata) triples of part `part` of `parts` (module docstring);
    `shuffle` is the sample buffer size (0: in order)."""
    urls = expand_shards(spec)
    by_shard = len(urls) >= parts
    if by_shard:
        urls = urls[part::parts]
    # the splitting is ours (above), not webdataset's rank/worker splitters, so it is the same in one
    # process with several micro-batches as over several ranks
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, empty_check=False,
                        nodesplitter=None, workersplitter=None)
    if not by_shard and parts > 1:
        ds = ds.slice(part, None, parts)
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed)   # unseeded, webdataset seeds from pid and time
    return ds.decode("pil").to_tuple("png;jpg;jpeg;webp", "txt", "json").map_tuple(_to_tensor, str, dict)


class _RetentionStream(torch.utils.data.IterableDataset):
    """Endless batches of one stream; each DataLoader worker reads its own part."""

    def __init__(self, spec, batch: int, stream: int, streams: int, seed: int):
        self.spec, self.batch, self.stream, self.streams, self.seed = spec, batch, stream, streams, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.stream * workers + w, self.streams * workers
        epoch, rows = 0, []
        while True:
            seen = 0
            for image, caption, _ in image_caption_dataset(self.spec, shuffle=256, part=part, parts=parts,
                                                           seed=self.seed * 7919 + part * 131 + epoch):
                rows.append((image, caption))
                seen += 1
                if len(rows) == self.batch:
                    yield torch.stack([r[0] for r in rows]), [r[1] for r in rows]
                    rows = []
            if not seen:
                raise ShardError(f"{self.spec}: part {part} of {parts} holds no samples (more streams than samples?)")
            epoch += 1


def retention_batches(spec, batch: int, stream: int = 0, streams: int = 1, seed: int = 0, workers: int = 0,
                      skip: int = 0):
    """An endless iterator of (images, captions) batches of stream `stream` of `streams`; the first `skip`
    batches are read past (a resumed job). With `workers` > 0 DataLoader workers decode in parallel
    (its round-robin over workers is deterministic, so positions stay exact)."""
    expand_shards(spec)   # a clear error now, not in a worker
    ds = _RetentionStream(spec, batch, stream, streams, seed)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                          persistent_workers=workers > 0) if workers else ds)
    for _ in range(skip):
        next(it)
    return it
