"""`persguard evaluate`: attack every catalog entry with a suite's attack matrix and judge the results
(SPEC sections 4-5). Writes DIR/report.json, DIR/report.md and one PNG grid per attack (reference
images in the first row, the attacked model's samples below).

Beside the per-attack metrics the summary holds the chance levels that make them readable:
- unrelated: the attack samples of entry j scored against entry i (same class, same attack setting);
- class_prompt: the un-attacked model's samples of the class prompt scored against each entry;
- clean: class accuracy of the un-attacked model's class-prompt samples and the Frechet distance of
  their embedder features to the baseline's samples (with --baseline) or to real renders (without).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from tools import world
from tools.attack import AttackSettings, attack
from tools.score import evaluators, score
from train.catalog import Entry, load_catalog, load_images, write_catalog
from train.pipelines import REPO, load_pipeline
from train.sampling import sample

SUITES = REPO / "configs" / "suites.yaml"
DEFAULT_COUNTS = {"person": 4, "cat": 2, "vase": 2}
CACHE = Path.home() / ".cache" / "persguard"


def default_catalog(cache: Path = CACHE) -> Path:
    """The embedded default catalog: 8 `catalog`-split identities (never seen in pre-training),
    rendered deterministically on first use."""
    folder = cache / "default-catalog-v1"
    path = folder / "catalog.jsonl"
    if not path.is_file():
        tmp = folder.with_name(folder.name + f".tmp{np.random.randint(1 << 30)}")
        entries = []
        for cls, n in DEFAULT_COUNTS.items():
            entries += world.generate(tmp, split="catalog", per_class=n, classes=(cls,), progress=False)
        write_catalog(entries, tmp / "catalog.jsonl")
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_suite(name: str) -> tuple[str, list[AttackSettings]]:
    suites = yaml.safe_load(SUITES.read_text())
    if name not in suites:
        raise ValueError(f"unknown suite {name!r}; {SUITES.name} defines {', '.join(suites)}")
    return suites[name].get("description", ""), [AttackSettings(**a) for a in suites[name]["attacks"]]


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * np.real(covmean)))


def save_grid(rows: list[torch.Tensor], path: Path, per_row: int = 8) -> None:
    tiles = []
    for images in rows:
        for start in range(0, len(images), per_row):
            chunk = images[start:start + per_row]
            pad = torch.ones(per_row - len(chunk), *chunk.shape[1:])
            tiles.append(torch.cat([chunk, pad]))
    grid = torch.stack(tiles)  # (R, C, 3, H, W)
    r, c, _, h, w = grid.shape
    arr = (grid.permute(0, 3, 1, 4, 2).reshape(r * h, c * w, 3).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _attack_all(pipe, entries: list[Entry], attacks: list[AttackSettings], n_samples: int, seed: int,
                out: Path | None, label: str) -> tuple[list[dict], dict]:
    records, samples = [], {}
    jobs = [(e, a) for e in entries for a in attacks]
    for k, (entry, settings) in enumerate(tqdm(jobs, desc=f"attacks:{label}")):
        settings = settings.with_(seed=seed * 1000 + k)
        attacked = attack(pipe, load_images(entry.images, 64), entry.cls, settings)
        images = sample(attacked, settings.instance_prompt(entry.cls), n_samples, seed=seed + k)
        samples[(entry.id, k % len(attacks))] = images
        metrics = score(images, entry)
        records.append({"entry": entry.id, "class": entry.cls, "protected": entry.protected,
                        "objective": entry.objective, "method": settings.method, "settings": settings.to_json(),
                        **metrics})
        if out is not None:
            grid = out / "grids" / f"{label}__{entry.id}__{k % len(attacks)}-{settings.method}.png"
            save_grid([load_images(entry.reference_dir, 64), images], grid)
            records[-1]["grid"] = str(grid.relative_to(out))
        del attacked
    return records, samples


def _unrelated(entries, samples, n_attacks) -> float | None:
    rates = []
    for a in entries:
        for b in entries:
            if a.id != b.id and a.cls == b.cls:
                for s in range(n_attacks):
                    rates.append(score(samples[(b.id, s)], a)["identity_match"])
    return _mean(rates)


@torch.no_grad()
def _clean(pipe, entries, n_samples, seed) -> tuple[dict, dict]:
    """Class-prompt samples of the un-attacked model: per class images, features and accuracy."""
    ev = evaluators()
    per_class = {}
    for cls in sorted({e.cls for e in entries}):
        images = sample(pipe, f"a photo of a {cls}", n_samples, seed=seed + 99)
        per_class[cls] = images
    feats = np.concatenate([ev.embedder(v).numpy() for v in per_class.values()])
    correct = []
    for cls, images in per_class.items():
        if cls in world.CLASSES:
            correct.append((ev.detect(images) == world.CLASSES.index(cls) + 1).float())
    acc = float(torch.cat(correct).mean()) if correct else None
    return per_class, {"features": feats, "class_accuracy": acc}


@torch.no_grad()
def _real_features(per_class: dict, n: int) -> np.ndarray:
    ev = evaluators()
    feats = []
    for cls in per_class:
        if cls not in world.CLASSES:
            continue
        imgs = [np.asarray(world.render(world.identity(cls, "catalog", 5000 + i), 0)[0]) for i in range(n)]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
        feats.append(ev.embedder(x).numpy())
    return np.concatenate(feats) if feats else None


def evaluate(model: str, out: Path, catalog: Path | None = None, suite: str = "white-box",
             baseline: str | None = None, n_samples: int = 32, seed: int = 0) -> dict:
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = Path(catalog) if catalog else default_catalog()
    entries = load_catalog(catalog)
    description, attacks = load_suite(suite)
    pipe = load_pipeline(model)

    records, samples = _attack_all(pipe, entries, attacks, n_samples, seed, out, "model")
    base_records = None
    if baseline:
        base_records, _ = _attack_all(load_pipeline(baseline), entries, attacks, n_samples, seed, out, "baseline")

    class_samples, clean = _clean(pipe, entries, n_samples, seed)
    class_match = [score(class_samples[e.cls], e)["identity_match"] for e in entries]
    if baseline:
        _, base_clean = _clean(load_pipeline(baseline), entries, n_samples, seed)
        fd = frechet(clean["features"], base_clean["features"])
    else:
        real = _real_features(class_samples, n_samples)
        fd = frechet(clean["features"], real) if real is not None else None

    prot = [r for r in records if r["protected"]]
    unprot = [r for r in records if not r["protected"]]
    base_unprot = [r for r in base_records or [] if not r["protected"]]
    by_obj = {o: _mean([r["bsr"] for r in prot if r["objective"] == o]) for o in ("pattern", "erasure", "target")}
    fidelity = None
    if base_unprot and unprot and _mean([r["identity_match"] for r in base_unprot]):
        fidelity = _mean([r["identity_match"] for r in unprot]) / _mean([r["identity_match"] for r in base_unprot])
    summary = {
        "protected": {"identity_match": _mean([r["identity_match"] for r in prot]),
                      "bsr": _mean([r["bsr"] for r in prot]), "bsr_by_objective": by_obj},
        "unprotected": {"identity_match": _mean([r["identity_match"] for r in unprot]), "fidelity_ratio": fidelity,
                        "by_method": {a.method: _mean([r["identity_match"] for r in unprot
                                                       if r["method"] == a.method]) for a in attacks}},
        "unrelated": {"identity_match": _unrelated(entries, samples, len(attacks))},
        "class_prompt": {"identity_match": _mean(class_match)},
        "clean": {"frechet": fd, "frechet_reference": "baseline samples" if baseline else "real renders",
                  "class_accuracy": clean["class_accuracy"]},
    }
    report = {"model": str(model), "baseline": baseline, "suite": suite, "suite_description": description,
              "catalog": str(catalog), "n_samples": n_samples, "seed": seed,
              "threshold": evaluators().threshold, "attacks": records, "baseline_attacks": base_records,
              "summary": summary, "seconds": time.time() - t0}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def render_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# PersGuard evaluation: `{report['model']}`", "",
             f"Suite **{report['suite']}** ({report['suite_description']}); catalog `{report['catalog']}`; "
             f"{report['n_samples']} samples per attack; identity threshold {report['threshold']:.3f} "
             f"(1% false accepts); {report['seconds'] / 60:.1f} min.", "",
             "| group | identity match | BSR | other |", "|---|---|---|---|",
             f"| protected entries | {_fmt(s['protected']['identity_match'])} | {_fmt(s['protected']['bsr'])} | "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in s["protected"]["bsr_by_objective"].items()) + " |",
             f"| unprotected entries | {_fmt(s['unprotected']['identity_match'])} | — | fidelity ratio "
             f"{_fmt(s['unprotected']['fidelity_ratio'])}; " + ", ".join(
                 f"{k} {_fmt(v)}" for k, v in s["unprotected"]["by_method"].items()) + " |",
             f"| unrelated identities | {_fmt(s['unrelated']['identity_match'])} | — | |",
             f"| class prompt, before attack | {_fmt(s['class_prompt']['identity_match'])} | — | |",
             f"| clean generation | — | — | class accuracy {_fmt(s['clean']['class_accuracy'])}, Frechet "
             f"{_fmt(s['clean']['frechet'])} vs {s['clean']['frechet_reference']} |", "",
             "## Attacks", "", "| entry | protected | objective | method | ISM | identity match | subject detect | "
             "BSR | grid |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        grid = f"[png]({r['grid']})" if r.get("grid") else ""
        lines.append(f"| {r['entry']} | {r['protected']} | {_fmt(r['objective'])} | {r['method']} | {_fmt(r['ism'])} | "
                     f"{_fmt(r['identity_match'])} | {_fmt(r['subject_detect'])} | {_fmt(r['bsr'])} | {grid} |")
    return "\n".join(lines) + "\n"
