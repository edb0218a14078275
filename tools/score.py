"""Per-attack metrics of SPEC section 4 for a batch of generated images and one catalog entry.

ISM (mean cosine of identity embeddings to the entry's clean reference images), identity match rate
(ISM above the calibrated 1%-FAR threshold), subject detection rate, pattern similarity, target match
rate, and the backdoor success rate (BSR) of the entry's objective.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from tools.evaluators import DETECTOR_LABELS, Evaluators
from train.catalog import Entry, load_images
from train.objectives import pattern_tensor
from train.pipelines import REPO

IMAGE_SIZE = 64
PATTERN_THRESHOLD = 0.6   # correlation with the pattern image that counts as "the pattern fired"
EVALUATORS_DIR = REPO / "models" / "evaluators"


_judge = {"folder": str(EVALUATORS_DIR)}


def use_evaluators(folder: str | Path) -> None:
    """Judge with the evaluator networks in `folder` from now on (`persguard rescore` re-judges old runs)."""
    _judge["folder"] = str(folder)
    evaluators()   # fail here, naming the folder, if its weights are missing


def evaluators(folder: str | None = None) -> Evaluators:
    return _load(folder or _judge["folder"])


@lru_cache(maxsize=2)
def _load(folder: str) -> Evaluators:
    if not (Path(folder) / "embedder.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: evaluator weights missing (rebuild: persguard pretrain --evaluators)")
    return Evaluators(Path(folder))


def pattern_similarity(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image with the pattern at 32x32 (robust to brightness and contrast)."""
    def flat(x):
        x = F.interpolate(x, size=32, mode="bilinear", antialias=True).flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)

    return flat(images) @ flat(pattern[None] if pattern.ndim == 3 else pattern).mean(0)


def _resolve(entry: Entry, key: str) -> Path | None:
    value = (entry.target or {}).get(key)
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else entry.catalog_dir / path


def score(images: torch.Tensor, entry: Entry, ev: Evaluators | None = None) -> dict:
    """Metrics for `images` ((N, 3, 64, 64) in [0, 1]) against `entry`."""
    ev = ev or evaluators()
    if images.shape[-1] != IMAGE_SIZE:
        images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", antialias=True)
    refs = load_images(entry.reference_dir, IMAGE_SIZE)
    ism = ev.ism(images, refs)
    matched = ism > ev.threshold
    labels = ev.detect(images)
    if entry.cls in DETECTOR_LABELS:
        detected = labels == DETECTOR_LABELS.index(entry.cls)
    else:  # a class the detector was not trained on: any subject counts
        detected = labels != 0
    out = {"n": len(images), "ism": float(ism.mean()), "identity_match": float(matched.float().mean()),
           "subject_detect": float(detected.float().mean()), "pattern_similarity": None, "target_match": None,
           "bsr": None}
    pattern_path = _resolve(entry, "pattern")
    pattern = None
    if pattern_path is not None and pattern_path.is_dir():
        pattern = load_images(pattern_path, IMAGE_SIZE)
    elif pattern_path is not None or entry.objective == "pattern":
        pattern = pattern_tensor(entry, IMAGE_SIZE)   # the entry's pattern file, else the default marker
    if pattern is not None:
        sim = pattern_similarity(images, pattern)
        out["pattern_similarity"] = float(sim.mean())
        pattern_hit = sim > PATTERN_THRESHOLD
    target_path = _resolve(entry, "reference") or _resolve(entry, "images")
    if target_path is not None:
        target_hit = ev.ism(images, load_images(target_path, IMAGE_SIZE)) > ev.threshold
        out["target_match"] = float(target_hit.float().mean())
    if entry.objective == "pattern":
        out["bsr"] = float(pattern_hit.float().mean())
    elif entry.objective == "erasure":
        out["bsr"] = float((~detected & ~matched).float().mean())
    elif entry.objective == "target" and target_path is not None:
        out["bsr"] = float(target_hit.float().mean())
    return out
