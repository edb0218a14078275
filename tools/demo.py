"""`persguard demo` / `make demo`: the whole story on the embedded default, on CPU, in minutes.

1. render a small catalog of the tiny world into OUT (identities never seen in pre-training): one
   protected entry per objective, faces among them (pattern, erasure, target: a substitute person), and
   two unprotected entries (a person and a cat);
2. `persguard protect` with configs/demo.yaml -> OUT/protected (the released pipeline) + OUT/manifest.json;
3. `persguard evaluate` of the protected model with the original as baseline (suite "demo": the white-box
   DreamBooth attack) -> OUT/report.json, OUT/report.md, OUT/grids/; the comparison table is printed.
"""
from __future__ import annotations

from pathlib import Path

from tools import world
from train.catalog import write_catalog
from train.pipelines import REPO

DEMO_CONFIG = REPO / "configs" / "demo.yaml"
OBJECTIVES = ("pattern", "erasure", "target")
SUBSTITUTE_START = 1000   # catalog-split indices of substitute identities (never entries themselves)


def mark_protected(entries: list[dict], n: int, folder: Path, seed: int = 0,
                   substitutes: dict[str, list[int]] | None = None,
                   substitute_classes: dict[str, str] | None = None,
                   objectives: tuple[str, ...] = OBJECTIVES) -> list[dict]:
    """Protect `n` of the rendered `entries` (dicts of world.generate, paths relative to `folder`), taken
    round-robin across classes so every class keeps protected and unprotected entries; within a class the
    `objectives` cycle (pattern, erasure, target by default; shifted per class, so every class meets each). A target
    entry's substitute is another identity of its class, rendered into `folder`: its photos and their
    subject-free twins are the target images, its held-out reference views what the evaluation judges by.
    With `substitutes` (tools/substitutes.py: load_ranking), a class's target entries take its ranked
    candidates in order, best first; otherwise identity SUBSTITUTE_START + k for the k-th protected entry.
    `substitute_classes` ({"cat": "vase"}) takes a class's substitutes from another class (SPEC: "a rabbit
    instead of the dog"), its ranked candidates shared in order with that class's own target entries."""
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if not objectives or unknown:
        raise ValueError(f"objectives must be some of {', '.join(OBJECTIVES)}, got {', '.join(objectives) or 'none'}")
    by_class: dict[str, list[dict]] = {}
    for e in entries:
        by_class.setdefault(e["class"], []).append(e)
    order = [q[i] for i in range(max(map(len, by_class.values()))) for q in by_class.values() if i < len(q)]
    if n > len(order):
        raise ValueError(f"cannot protect {n} of {len(order)} entries")
    classes, seen, targets = list(by_class), {c: 0 for c in by_class}, {}
    for k, e in enumerate(order[:n]):
        e.update(protected=True, objective=objectives[(seen[e["class"]] + classes.index(e["class"])) % len(objectives)])
        seen[e["class"]] += 1
        if e["objective"] == "target":
            cls, index = (substitute_classes or {}).get(e["class"], e["class"]), SUBSTITUTE_START + k
            if substitutes is not None:
                ranked = substitutes.get(cls)
                if not ranked:
                    raise ValueError(f"no ranked substitute candidates of class {cls!r}")
                index = ranked[targets.get(cls, 0) % len(ranked)]
                targets[cls] = targets.get(cls, 0) + 1
            sub = world.generate(folder, split="catalog", per_class=1, classes=(cls,), seed=seed,
                                 start=index, progress=False)[0]
            if any(sub["id"] == other["id"] for other in entries):
                raise ValueError(f"substitute {sub['id']} is itself an entry of the catalog")
            e["target"] = {k: sub[k] for k in ("images", "backgrounds", "reference")}
    return entries


def build_demo_catalog(out: Path) -> Path:
    """OUT/catalog.jsonl: 4 persons and a cat (identities never seen in pre-training), the first three
    persons protected (pattern, erasure, target), one person and the cat unprotected."""
    folder = Path(out) / "world"
    entries = world.generate(folder, split="catalog", per_class=4, classes=("person",), progress=False)
    entries += world.generate(folder, split="catalog", per_class=1, classes=("cat",), progress=False)
    mark_protected(entries[:4], 3, folder)
    for e in entries:   # paths relative to OUT, where the catalog file lives
        e.update({k: f"world/{e[k]}" for k in ("images", "reference", "backgrounds")})
        if e["target"]:
            e["target"] = {k: f"world/{v}" for k, v in e["target"].items()}
    path = Path(out) / "catalog.jsonl"
    write_catalog(entries, path)
    return path


def run_demo(out: Path, model: str = "tiny-sd", samples: int = 32, seed: int = 0, overrides: list[str] = (),
             suite: str = "demo", workers: int = 2) -> dict:
    from tools.evaluate import evaluate
    from train.config import load_config
    from train.protect import protect

    out = Path(out)
    catalog = build_demo_catalog(out)
    cfg = load_config(DEMO_CONFIG, [f"model={model}", f"catalog={catalog}", f"out={out}", f"seed={seed}",
                                    *overrides])
    result = protect(cfg)
    report = evaluate(result["protected"], out, catalog=catalog, suite=suite, baseline=model,
                      n_samples=samples, seed=seed, workers=workers)
    return {"protect": result, "report": report}
