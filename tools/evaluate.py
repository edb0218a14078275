"""`persguard evaluate`: attack every catalog entry with a suite's attack matrix and judge the results
(SPEC sections 4-5). Writes DIR/report.json, DIR/report.md and one PNG grid per attack (reference
images in the first row, the attacked model's samples below).

Beside the per-attack metrics the summary holds the chance levels that make them readable:
- unrelated: the attack samples of entry j scored against entry i (same class, same attack setting);
- class_prompt: the un-attacked model's samples of the class prompt scored against each entry;
- clean: class accuracy of the un-attacked model's class-prompt samples and the Frechet distance of
  their embedder features to the baseline's samples (with --baseline) or to real renders (without);
  with --baseline also the original's own spread between two seeds, and whether the model is within it.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from tools import world
from tools.attack import AttackSettings, attack
from tools.diagnostics import diagnose
from tools.score import evaluators, score
from train import objectives
from train.catalog import Entry, load_catalog, load_images, write_catalog
from train.encoder_guard import entry_samples, transformed_gaps
from train.pipelines import REPO, load_pipeline
from train.sampling import mosaic, sample

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


def run_catalog(model: str | Path) -> str | None:
    """The catalog a `persguard protect` release was made from, as its run's manifest (`RUN/manifest.json`
    beside `RUN/protected`) names it; None for a model name or a folder without a readable manifest."""
    manifest = Path(model).parent / "manifest.json"
    if not Path(model).is_dir() or not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())["config"]["catalog"]
    except (ValueError, KeyError, TypeError):
        return None


THREAT_SUITES = ("white-box", "gray-box", "transforms", "adaptive")


def attack_label(settings: AttackSettings) -> str:
    """A row name for an attack setting: what it changes from the defaults (seed aside)."""
    default = AttackSettings()
    changed = [f"{k}={v}" if not isinstance(v, dict) else f"{k}=" + ",".join(f"{a}:{b}" for a, b in v.items())
               for k, v in asdict(settings).items() if k != "seed" and v != getattr(default, k)]
    return " ".join(changed) or "default"


def load_suite(name: str) -> tuple[str, list[AttackSettings], list[float] | None]:
    """(description, attack settings, attack-length multiples or None) of a suite in configs/suites.yaml;
    "all" is every threat-model suite (THREAT_SUITES) in one matrix."""
    suites = yaml.safe_load(SUITES.read_text())
    if name == "all":
        attacks = [a for n in THREAT_SUITES for a in load_suite(n)[1]]
        unique = list({attack_label(a): a for a in attacks}.values())   # white-box DreamBooth is in two suites
        return "every threat-model suite: " + ", ".join(THREAT_SUITES), unique, None
    if name not in suites:
        raise ValueError(f"unknown suite {name!r}; {SUITES.name} defines {', '.join(suites)} (and 'all')")
    suite = suites[name]
    multiples = suite.get("multiples")
    if multiples is not None and (1 not in multiples or any(m <= 0 for m in multiples)):
        raise ValueError(f"{SUITES.name}: suite {name!r}: multiples must be positive and include 1")
    try:
        attacks = [AttackSettings(**a) for a in suite["attacks"]]
    except TypeError as e:
        raise ValueError(f"{SUITES.name}: suite {name!r}: {e}") from None
    return suite.get("description", ""), attacks, multiples


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb)
    # identical feature sets give a tiny negative number (sqrtm round-off); a distance is never below 0
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * np.real(covmean))))


def save_grid(rows: list[torch.Tensor], path: Path, per_row: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mosaic(rows, per_row)).save(path)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def lookalike(entries: list[Entry], entry: Entry) -> Entry:
    """The adaptive attacker's look-alike for `entry`: the next other entry of the same class in catalog
    order, unprotected ones first (the attacker mixes in a subject PersGuard is not keyed on)."""
    i = entries.index(entry)
    same = [e for e in entries[i + 1:] + entries[:i] if e.cls == entry.cls]
    if not same:
        raise ValueError(f"entry {entry.id!r}: no other {entry.cls!r} entry in the catalog to mix in as a look-alike")
    return next((e for e in same if not e.protected), same[0])


def _attack_job(pipe, entry: Entry, settings: AttackSettings, job: int, n_samples: int, seed: int,
                out: Path | None, label: str, multiples: list[float] | None, slot: int,
                mix_entry: Entry | None) -> tuple[list[dict], torch.Tensor | None]:
    """One (entry, setting) attack: its records (one per multiple) and its samples at the suite's length."""
    records, kept = [], None
    stops = {max(1, round(m * settings.steps)): m for m in (multiples or [1])}

    def judge(step, attacked):
        nonlocal kept
        if step not in stops:
            return
        run = settings.with_(steps=step)
        images = sample(attacked, run.instance_prompt(entry.cls), n_samples, seed=seed + job)
        if stops[step] == 1 or not multiples:
            kept = images
        records.append({"entry": entry.id, "class": entry.cls, "protected": entry.protected,
                        "objective": entry.objective, "method": run.method, "attack": attack_label(settings),
                        "multiple": stops[step], "settings": run.to_json(), **score(images, entry)})
        if out is not None:
            grid = out / "grids" / f"{label}__{entry.id}__{slot}-{run.method}-{step}steps.png"
            save_grid([load_images(entry.reference_dir, 64), images], grid)
            records[-1]["grid"] = str(grid.relative_to(out))

    mix = load_images(mix_entry.images, 64) if mix_entry is not None else None
    attack(pipe, load_images(entry.images, 64), entry.cls, settings.with_(steps=max(stops)), on_step=judge,
           mix_images=mix)
    return records, kept


_WORKER_PIPES: dict = {}   # in a worker process: pipelines loaded once per model reference


def _attack_job_in_worker(model: str, *args):
    if model not in _WORKER_PIPES:
        _WORKER_PIPES[model] = load_pipeline(model)
    return _attack_job(_WORKER_PIPES[model], *args)


def _attack_all(models: dict[str, tuple[str, object]], entries: list[Entry], attacks: list[AttackSettings],
                n_samples: int, seed: int, out: Path | None, multiples: list[float] | None = None,
                workers: int = 1) -> dict[str, tuple[list[dict], dict]]:
    """Attack every entry with every setting, for each labelled model ({label: (reference, loaded pipe)}).
    With `multiples` (e.g. [0.5, 1, 2, 4, 8]) one attack per (entry, setting) runs to the longest length and
    is sampled at each multiple of its `steps` on the way: one record per multiple, so protection is a curve
    over the attacker's budget, not a point. With `workers` > 1 the attacks run in that many processes
    (this process's threads shared among them: the tiny models use one core far better than two); the
    seeds are per attack, so the records are those of one process. Returns {label: (records, samples)}."""
    mixes = {e.id: lookalike(entries, e) for e in entries} if any(a.mix_fraction for a in attacks) else {}
    jobs = [(label, k, entry, settings.with_(seed=seed * 1000 + k), k % len(attacks))
            for label in models for k, (entry, settings) in enumerate((e, a) for e in entries for a in attacks)]

    def args(label, k, entry, settings, slot):
        return (entry, settings, k, n_samples, seed, out, label, multiples, slot,
                mixes.get(entry.id) if settings.mix_fraction else None)

    results = {}
    if workers <= 1:
        for label, k, entry, settings, slot in tqdm(jobs, desc="attacks"):
            results[label, k] = _attack_job(models[label][1], *args(label, k, entry, settings, slot))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            futures = {pool.submit(_attack_job_in_worker, models[job[0]][0], *args(*job)): job[:2] for job in jobs}
            for f in tqdm(as_completed(futures), total=len(futures), desc=f"attacks ({workers} workers)"):
                results[futures[f]] = f.result()
    done = {label: ([], {}) for label in models}
    for label, k, entry, _, slot in jobs:
        records, images = results[label, k]
        done[label][0].extend(records)
        done[label][1][entry.id, slot] = images
    return done


def _curve(records: list[dict], base_records: list[dict] | None, multiples: list[float]) -> dict:
    """Per attack-length multiple: protected BSR / identity match and unprotected identity match, beside the
    baseline's; and the smallest multiple at which protected BSR falls below 0.5 (None: never, up to the max)."""
    def at(rs, m, protected, key):
        return _mean([r[key] for r in rs or [] if r["multiple"] == m and r["protected"] == protected])

    points = [{"multiple": m, "steps": next((r["settings"]["steps"] for r in records if r["multiple"] == m), None),
               "protected_bsr": at(records, m, True, "bsr"),
               "protected_identity_match": at(records, m, True, "identity_match"),
               "unprotected_identity_match": at(records, m, False, "identity_match"),
               "baseline_protected_identity_match": at(base_records, m, True, "identity_match"),
               "baseline_unprotected_identity_match": at(base_records, m, False, "identity_match")}
              for m in multiples]
    below = [p["multiple"] for p in points if p["protected_bsr"] is not None and p["protected_bsr"] < 0.5]
    return {"points": points, "bsr_below_half_at": below[0] if below else None}


def _diagnostics(pipe, base, entries: list[Entry], attacks: list[AttackSettings], seed: int) -> dict | None:
    """tools.diagnostics per protected entry, for the model and (with --baseline) the original, plus
    the means over protected entries; with --baseline also the encoder's latent gap (an encoder guard's
    reach) of the protected photos under each transform of the suite, per objective with image targets
    (targets built as protect builds them by default: substitutes transplanted where they have twins)."""
    protected = [e for e in entries if e.protected]
    if not protected:
        return None
    settings = attacks[0]
    encoder_gap = None
    judged = [e for e in protected if objectives.resolve(e).images is not None]
    if base is not None and judged:
        specs = list(dict.fromkeys(a.transform for a in attacks))
        encoder_gap = transformed_gaps(pipe.vae, base.vae, entry_samples(judged), specs, seed)
    per_entry = {e.id: {"model": diagnose(pipe, e, settings.instance_prompt(e.cls), seed=seed),
                        "baseline": diagnose(base, e, settings.instance_prompt(e.cls), seed=seed) if base else None}
                 for e in protected}

    def mean(which, key):
        rows = [d[which][key] for d in per_entry.values() if d[which] and d[which][key]]
        return {b: _mean([r[b] for r in rows]) for b in rows[0]} if rows else None

    return {"prompt_template": settings.template, "entries": per_entry,
            "attacker_loss": {"model": mean("model", "attacker_loss"), "baseline": mean("baseline", "attacker_loss")},
            "backdoor_acts": {"model": mean("model", "backdoor_acts"), "baseline": mean("baseline", "backdoor_acts")},
            "encoder_gap": encoder_gap}


def attack_summary(records: list[dict], base_records: list[dict] | None, entries: list[Entry], samples: dict,
                   n_attacks: int) -> dict:
    """The summary's parts judged from the attacks at the suite's own length: protected identity match and BSR
    (per objective), unprotected identity match and fidelity against the baseline, unrelated identities."""
    prot = [r for r in records if r["protected"]]
    unprot = [r for r in records if not r["protected"]]
    base_unprot = [r for r in base_records or [] if not r["protected"]]
    by_obj = {o: _mean([r["bsr"] for r in prot if r["objective"] == o]) for o in ("pattern", "erasure", "target")}
    fidelity = None
    if base_unprot and unprot and _mean([r["identity_match"] for r in base_unprot]):
        fidelity = _mean([r["identity_match"] for r in unprot]) / _mean([r["identity_match"] for r in base_unprot])
    methods = dict.fromkeys(r["method"] for r in records)
    return {
        "protected": {"identity_match": _mean([r["identity_match"] for r in prot]),
                      "bsr": _mean([r["bsr"] for r in prot]), "bsr_by_objective": by_obj},
        "unprotected": {"identity_match": _mean([r["identity_match"] for r in unprot]), "fidelity_ratio": fidelity,
                        "by_method": {m: _mean([r["identity_match"] for r in unprot if r["method"] == m])
                                      for m in methods}},
        "unrelated": {"identity_match": _unrelated(entries, samples, n_attacks)},
    }


def _unrelated(entries, samples, n_attacks) -> float | None:
    rates = []
    for a in entries:
        for b in entries:
            if a.id != b.id and a.cls == b.cls:
                for s in range(n_attacks):
                    rates.append(score(samples[(b.id, s)], a)["identity_match"])
    return _mean(rates)


# SPEC section 5's white-box targets on the embedded world (the PersGuard issue's acceptance)
WHITE_BOX_BSR, FIDELITY_MIN = 0.95, 0.9


def white_box_verdict(summary: dict) -> dict:
    """Which white-box acceptance checks an evaluation's summary meets: BSR >= 0.95 for every objective judged,
    protected identity match <= the unrelated identities', unprotected fidelity >= 0.9 and clean drift within
    the original's seed spread (both need --baseline). None: not measured; `met` needs every measured
    check and the BSR one."""
    prot, unrelated = summary["protected"], (summary.get("unrelated") or {}).get("identity_match")
    by_objective = prot.get("bsr_by_objective") or {}
    fidelity = (summary.get("unprotected") or {}).get("fidelity_ratio")
    spread = (summary.get("clean") or {}).get("seed_spread")
    bsr = [v for v in by_objective.values() if v is not None]   # None: no entry of that objective was judged
    checks = {"bsr_every_objective": min(bsr) >= WHITE_BOX_BSR if bsr else None,
              "identity_match_at_most_unrelated": (prot["identity_match"] <= unrelated
                                                   if None not in (prot.get("identity_match"), unrelated) else None),
              "unprotected_fidelity": fidelity >= FIDELITY_MIN if fidelity is not None else None,
              "clean_within_seed_spread": spread["within"] if spread else None}
    met = checks["bsr_every_objective"] is True and all(v is not False for v in checks.values())
    return {"checks": checks, "met": met, "bsr_by_objective": by_objective}


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


def seed_spread(clean: dict, base: dict, base_again: dict) -> dict:
    """Is the model's clean generation as close to the original's as two seeds of the original are to
    each other? The spread is the Frechet distance and the class-accuracy difference between the
    original's samples at two seeds; the model is within it when its own distance and difference to the
    original (same seed) are no larger."""
    spread_fd = frechet(base["features"], base_again["features"])
    fd = frechet(clean["features"], base["features"])
    accs = (clean["class_accuracy"], base["class_accuracy"], base_again["class_accuracy"])
    acc_gap = acc_spread = None
    if None not in accs:
        acc_gap, acc_spread = abs(accs[0] - accs[1]), abs(accs[1] - accs[2])
    within = fd <= spread_fd and (acc_gap is None or acc_gap <= acc_spread)
    return {"frechet": spread_fd, "class_accuracy": acc_spread, "model_class_accuracy_gap": acc_gap,
            "within": bool(within)}


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


def reused_baseline_attacks(report_file: Path, baseline: str | None, catalog: Path, suite: str, n_samples: int,
                            seed: int, expected_entries: list[str]) -> list[dict]:
    """The baseline's attack records of an earlier evaluation with the same baseline, catalog, suite,
    samples and seed: the original model's attacks do not depend on the model judged, so comparing
    several releases of one run need not repeat them (half of each evaluation)."""
    try:
        old = json.loads(Path(report_file).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{report_file}: cannot read an evaluation report ({err})") from err
    if not baseline:
        raise ValueError(f"{report_file}: reusing baseline attacks needs --baseline")
    ours = {"baseline": str(baseline), "catalog": str(Path(catalog).resolve()), "suite": suite,
            "n_samples": n_samples, "seed": seed}
    theirs = {k: old.get(k) for k in ours}
    theirs["catalog"] = str(Path(old["catalog"]).resolve()) if old.get("catalog") else None
    differ = [f"{k} {theirs[k]!r} (here {v!r})" for k, v in ours.items() if theirs[k] != v]
    if not old.get("baseline_attacks"):
        differ.append("no baseline attacks")
    elif [r["entry"] for r in old["baseline_attacks"] if r["multiple"] == 1] != expected_entries:
        differ.append("other entries or order (the catalog changed since)")
    if differ:
        raise ValueError(f"{report_file}: its baseline attacks are not this evaluation's: " + "; ".join(differ))
    return old["baseline_attacks"]


def evaluate(model: str, out: Path, catalog: Path | None = None, suite: str = "white-box",
             baseline: str | None = None, n_samples: int = 32, seed: int = 0, workers: int = 1,
             baseline_attacks: Path | None = None) -> dict:
    """Attack every catalog entry with the suite, on `model` and (with `baseline`) on the original, and
    write report.json/.md. `baseline_attacks`: an earlier report.json whose baseline attacks are reused."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if catalog is None:
        catalog = default_catalog()
        named = run_catalog(model)
        if named is not None and Path(named).resolve() != catalog.resolve():
            # SPEC section 5: no --catalog judges the embedded default; a release of another catalog has none of
            # its protected entries there, which a report of nulls hides (docs/journal.md "Session 24")
            warnings.warn(f"evaluate: no --catalog, so the embedded default catalog is judged; {model} was "
                          f"protected from {named} ({Path(model).parent / 'manifest.json'}): pass --catalog "
                          f"{named}", stacklevel=2)
    catalog = Path(catalog)
    entries = load_catalog(catalog)
    description, attacks, multiples = load_suite(suite)
    pipe = load_pipeline(model)

    base_pipe = load_pipeline(baseline) if baseline else None

    reused = reused_baseline_attacks(baseline_attacks, baseline, catalog, suite, n_samples, seed,
                                     [e.id for e in entries for _ in attacks]) if baseline_attacks else None
    models = {"model": (str(model), pipe),
              **({"baseline": (str(baseline), base_pipe)} if baseline and reused is None else {})}
    attacked = _attack_all(models, entries, attacks, n_samples, seed, out, multiples, workers)
    records, samples = attacked["model"]
    base_records = reused if reused is not None else attacked["baseline"][0] if baseline else None
    curve = _curve(records, base_records, multiples) if multiples else None
    diagnostics = _diagnostics(pipe, base_pipe, entries, attacks, seed)
    all_records, all_base = records, base_records
    records = [r for r in records if r["multiple"] == 1]   # the summary is taken at the suite's own length
    base_records = [r for r in base_records if r["multiple"] == 1] if base_records is not None else None

    class_samples, clean = _clean(pipe, entries, n_samples, seed)
    class_match = [score(class_samples[e.cls], e)["identity_match"] for e in entries]
    spread = None
    if baseline:
        _, base_clean = _clean(base_pipe, entries, n_samples, seed)
        _, base_clean_again = _clean(base_pipe, entries, n_samples, seed + 1)
        fd = frechet(clean["features"], base_clean["features"])
        spread = seed_spread(clean, base_clean, base_clean_again)
    else:
        real = _real_features(class_samples, n_samples)
        fd = frechet(clean["features"], real) if real is not None else None

    summary = {
        **attack_summary(records, base_records, entries, samples, len(attacks)),
        "class_prompt": {"identity_match": _mean(class_match)},
        "clean": {"frechet": fd, "frechet_reference": "baseline samples" if baseline else "real renders",
                  "class_accuracy": clean["class_accuracy"], "seed_spread": spread},
        "curve": curve,
    }
    report = {"model": str(model), "baseline": baseline, "suite": suite, "suite_description": description,
              "catalog": str(catalog), "n_samples": n_samples, "seed": seed,
              "threshold": evaluators().threshold, "attacks": all_records, "baseline_attacks": all_base,
              "baseline_attacks_from": str(baseline_attacks) if baseline_attacks else None,
              "diagnostics": diagnostics,
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
             ]
    sp = s["clean"].get("seed_spread")
    if sp:
        lines += [f"Clean generation against the original's spread between two seeds: Frechet "
                  f"{_fmt(s['clean']['frechet'])} (two seeds of the original: {_fmt(sp['frechet'])}), class "
                  f"accuracy gap {_fmt(sp['model_class_accuracy_gap'])} (two seeds: {_fmt(sp['class_accuracy'])}): "
                  f"**{'within' if sp['within'] else 'OUTSIDE'}** the spread.", ""]
    if s.get("curve"):
        c = s["curve"]
        lines += ["## Protection against attack length", "",
                  f"BSR of protected entries falls below 0.5 at: **{_fmt(c['bsr_below_half_at'])}x** the attack length "
                  "(— : never, up to the longest attack).", "",
                  "| attack length | steps | protected BSR | protected identity match | unprotected identity match | "
                  "original: protected-entry identity match | original: unprotected identity match |",
                  "|---|---|---|---|---|---|---|"]
        for q in c["points"]:
            lines.append(f"| {q['multiple']}x | {q['steps']} | {_fmt(q['protected_bsr'])} | "
                         f"{_fmt(q['protected_identity_match'])} | {_fmt(q['unprotected_identity_match'])} | "
                         f"{_fmt(q['baseline_protected_identity_match'])} | "
                         f"{_fmt(q['baseline_unprotected_identity_match'])} |")
        lines.append("")
    d = report.get("diagnostics")
    if d:
        buckets = list(d["attacker_loss"]["model"])
        lines += ["## Diagnostics: where the backdoor lives", "",
                  "The attacker's DreamBooth loss on protected entries' own images under the trigger, and the "
                  "fraction of one-step predictions pulled to the objective's target, per noise level "
                  "(mean over protected entries; original model beside).", "",
                  "| | " + " | ".join(buckets) + " |", "|---" * (len(buckets) + 1) + "|"]
        for name, key, which in (("attacker loss, protected model", "attacker_loss", "model"),
                                 ("attacker loss, original model", "attacker_loss", "baseline"),
                                 ("backdoor acts, protected model", "backdoor_acts", "model"),
                                 ("backdoor acts, original model", "backdoor_acts", "baseline")):
            row = d[key][which]
            if row:
                lines.append(f"| {name} | " + " | ".join(_fmt(row.get(b)) for b in buckets) + " |")
        lines.append("")
        gaps = d.get("encoder_gap")
        if gaps:
            objs = list(dict.fromkeys(o for row in gaps.values() for o in row))
            lines += ["Encoder latent gap: how close the protected photos, as the attacker transformed them, encode "
                      "to the objective's target (0: the target itself, 1: as the original encoder puts them).", "",
                      "| transform | " + " | ".join(objs) + " |", "|---" * (len(objs) + 1) + "|"]
            lines += [f"| {spec} | " + " | ".join("—" if row.get(o) is None else f"{row[o]:.3f}" for o in objs) + " |"
                      for spec, row in gaps.items()]
            lines.append("")
    if report.get("baseline_attacks"):
        base = {(r["entry"], r.get("attack", r["method"]), r.get("multiple", 1)): r for r in report["baseline_attacks"]}
        lines += ["## Original vs protected model (same attack, same seeds)", "",
                  "| entry | protected | objective | method | length | original: identity match | "
                  "protected model: identity match | protected model: BSR |", "|---|---|---|---|---|---|---|---|"]
        for r in report["attacks"]:
            b = base.get((r["entry"], r.get("attack", r["method"]), r.get("multiple", 1)), {})
            lines.append(f"| {r['entry']} | {r['protected']} | {_fmt(r['objective'])} | {r['method']} | "
                         f"{r.get('multiple', 1)}x | {_fmt(b.get('identity_match'))} | {_fmt(r['identity_match'])} | "
                         f"{_fmt(r['bsr'])} |")
        lines.append("")
    lines += ["## Attacks", "", "| entry | protected | objective | method | length | ISM | identity match | "
              "subject detect | BSR | grid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["attacks"]:
        grid = f"[png]({r['grid']})" if r.get("grid") else ""
        lines.append(f"| {r['entry']} | {r['protected']} | {_fmt(r['objective'])} | {r['method']} | "
                     f"{r.get('multiple', 1)}x | {_fmt(r['ism'])} | {_fmt(r['identity_match'])} | "
                     f"{_fmt(r['subject_detect'])} | {_fmt(r['bsr'])} | {grid} |")
    return "\n".join(lines) + "\n"
