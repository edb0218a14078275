"""`persguard bench`: what a PersGuard step costs next to the attack it defends against, and what feeds it.

One process, one run, the same model and batch size (the config's `batch_protected`):
- step time: a plain DreamBooth step (the attacker's step of tools/attack.py) vs a full PersGuard step
  (`Protector.train_step`), interleaved and alternating which goes first, so machine noise hits both
  alike; medians. Each PersGuard term is timed on its own, computed as `micro_step` computes it
  (behaviour, prior, retention trajectories, selectivity; each with its backward); `other` is the rest
  of the step (gradient merge, clipping, the optimizer). `step_ratio` = PersGuard step / plain step;
- samples/s (protect's own count: streams x batch_protected x 2 a step) and peak memory;
- data: retention-shard read throughput (train/data.py, 0 and 2 workers) vs what a step consumes
  (`prior.retention_batch` samples per stream per step): `loader_over_consumption`;
- the encoder guard's step (augmented and sharpening phases) against the same plain step, and the whole
  guard at the config's step counts against one attack of the default length (`guard_cost`); at
  `steps: 0` (the default configs) the UNet step never runs and `acceptance.guard_step_ratio_ok` judges
  the guard's mean step, `acceptance.step_ratio_ok` the implant's;
- catalogs of N tiny-world entries (`--catalog-sizes`, half of them protected): one-time set-up
  (pipeline, teacher, latent caching; the simulated attackers' catch-up in the first step) and seconds
  per step, hence wall time and cost per protected entry at the config's step budget;
- `--acceptance RUN...` (`time_to_acceptance`): no timing, the wall time of finished protect runs whose
  evaluations met the white-box acceptance, hence the catalog cost measured to acceptance.

Writes OUT/bench.json and OUT/bench.md, again after each catalog size (a long sweep never loses the step
comparison). On a CPU shared with other jobs run it with OMP_NUM_THREADS=1: threads that wait at barriers
for a descheduled partner burn the step (seen on the 2-core machine at load 4: two threads were still in the
catalog sweep after 80 min; one thread did the whole default bench in 4 min as the load fell to 1).
The SDXL-scale GPU step is tools/bench_sdxl.py
(`persguard bench --sdxl`); ZeRO stages vs one process is tools/bench_engine.py.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tools import world
from tools.attack import AttackSettings
from tools.bench_sdxl import machine, peak_memory_mb, reset_peak, synchronize
from tools.demo import DEMO_CONFIG, mark_protected
from train import retention
from train.catalog import load_catalog, write_catalog
from train.config import load_config
from train.data import retention_batches
from train.pipelines import REPO
from train.protect import Protector

STEP_RATIO_MAX, LOADER_MIN = 3.0, 5.0      # the acceptance
TERMS = ("behaviour", "prior", "retention", "selectivity")


class TimedProtector(Protector):
    """The trainer, unchanged, with its one-time latent caching done at set-up and timed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        t = time.perf_counter()
        self._latent_cache   # encoded at first use otherwise (the first step)
        self.cache_seconds = time.perf_counter() - t


class PlainDreamBooth:
    """The attacker's step of tools/attack.py on a copy of the same UNet (the frozen teacher: the model
    before protection): `n` instance + `n` class latents, epsilon MSE with prior preservation, backward,
    AdamW (weight decay 1e-2). The class latents are another entry's (the attack samples its class
    images from the model once, before its loop)."""

    def __init__(self, p: Protector, settings: AttackSettings = AttackSettings()):
        self.unet = copy.deepcopy(p.teacher).requires_grad_(True).train()
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
        e = p.protected[0]
        other = next((x for x in p.entries if x.id != e.id and x.id in p.latents), e)
        self.inst, self.cls = p.latents[e.id], p.latents[other.id]
        self.n, self.sched, self.gen = p.cfg.batch_protected, p.sched, torch.Generator().manual_seed(0)
        self.cond = p.prompts([settings.instance_prompt(e.cls)] * self.n + [settings.class_prompt(e.cls)] * self.n)

    def _draw(self, latents) -> torch.Tensor:
        mu, sd = latents
        idx = torch.randint(0, len(mu), (self.n,), generator=self.gen)
        return mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=self.gen).to(mu.device)

    def step(self) -> None:
        x0 = torch.cat([self._draw(self.inst), self._draw(self.cls)])
        noise = torch.randn(x0.shape, generator=self.gen).to(x0.device)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (len(x0),), generator=self.gen).to(x0.device)
        pred = self.unet(self.sched.add_noise(x0, noise, t), t, **self.cond).sample
        err = (pred - noise).pow(2).flatten(1).mean(1)
        (err[:self.n].mean() + err[self.n:].mean()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def term_steps(p: Protector) -> dict:
    """Each PersGuard term of the first micro-batch as `micro_step` computes it, backward included
    (gradients are dropped afterwards: the optimizer step belongs to the full step). Terms the config
    switches off are absent."""
    cfg, w = p.cfg, p.cfg.weights
    stream = p.local_streams().start
    backdoor = lambda f, e: p.behaviour(f, [p.by_id[e]])  # noqa: E731

    def behaviour():
        batch = [p.rng.choice(p.pool[0]) for _ in range(max(1, min(len(p.pool[0]), 2)))]
        (w.behaviour * p.behaviour(p.student, batch)).backward()

    def prior():
        (w.prior * p.prior(stream)).backward()

    def restart():
        e = p.rng.choice(p.pool[0])
        attacker, bd = (lambda f: p.attacker(f, e)), (lambda f: p.behaviour(f, [e]))
        r = cfg.retention
        if r.order == "first":
            retention.first_order(p.engine.scratch, p.engine.full_params(), attacker, bd, r.inner_steps, r.inner_lr)
        else:
            with retention.math_attention():
                (w.retention * retention.second_order(p.engine.scratch, dict(p.engine.params), attacker, bd,
                                                      r.inner_steps, r.inner_lr)).backward()

    terms = {"behaviour": behaviour}
    if w.prior > 0:
        terms["prior"] = prior
    if p.trajectories:
        terms["retention"] = lambda: p.trajectories[0].step(p.engine.scratch, p.engine.full_params(), p.attacker,
                                                            backdoor)
        if p.selectivity:
            terms["selectivity"] = lambda: p.selectivity[0].step(p.engine.scratch, p.engine.full_params(),
                                                                 p.attacker, p.drawn)
    elif cfg.retention.enabled and w.retention > 0:
        terms["retention"] = restart

    def seeded(fn):
        def run():
            p._seed(stream)   # what train_step does before each micro-batch
            fn()
            for q in p.engine.params.values():
                q.grad = None
        return run
    return {k: seeded(fn) for k, fn in terms.items()}


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def protected_catalog(catalog: Path, folder: Path, n: int = 3) -> Path:
    """`catalog` itself when it protects something; else (the embedded default protects nothing) a copy
    in `folder` with `n` entries (all but one at most) protected round-robin over classes and objectives,
    as the demo does."""
    entries = load_catalog(Path(catalog).resolve())
    if any(e.protected for e in entries):
        return Path(catalog)
    rows = [e.to_json() for e in entries]   # absolute paths: the copy lives elsewhere
    mark_protected(rows, min(n, max(1, len(rows) - 1)), folder)   # one entry at least stays unprotected
    write_catalog(rows, folder / "catalog.jsonl")
    return folder / "catalog.jsonl"


def world_catalog(n: int, folder: Path) -> Path:
    """`n` tiny-world identities (classes round-robin), max(1, n // 2) protected: `persguard world --protect`.
    Reused when an earlier bench rendered it into the same folder (the catalog file is written last)."""
    path = folder / "catalog.jsonl"
    if path.is_file():
        return path
    entries = []
    for i, cls in enumerate(world.CLASSES):
        if n // 3 + (i < n % 3):
            entries += world.generate(folder, per_class=n // 3 + (i < n % 3), classes=(cls,), n_reference=1,
                                      progress=False)
    mark_protected(entries, max(1, n // 2), folder)
    write_catalog(entries, path)
    return path


def _config(config, overrides, catalog: Path, out: Path):
    cfg = load_config(config, [*overrides, f"catalog={catalog}", f"out={out}"])
    if cfg.deepspeed:
        raise ValueError("persguard bench times one process; tools/bench_engine.py compares the ZeRO stages")
    return cfg


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def loader_throughput(p: Protector, workers: int, batches: int = 30) -> dict:
    """Samples/s of one retention stream read through train/data.py (the trainer's own reader), after
    its first batch (worker start-up, shuffle buffer), which is reported apart."""
    shards = Path(p.cfg.prior.shards)
    shards = shards if shards.is_absolute() or shards.exists() else REPO / shards
    batch = p.cfg.prior.retention_batch
    t = time.perf_counter()
    it = retention_batches(shards, batch, seed=p.cfg.seed, workers=workers)
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t
    del it   # stops the workers
    return {"workers": workers, "first_batch_s": first, "samples_per_s": batches * batch / seconds}


def catalog_cost(n: int, config, overrides, out: Path, steps: int, device: torch.device) -> dict:
    """Set-up and seconds per step of protecting a catalog of `n` tiny-world entries."""
    catalog = world_catalog(n, out / "catalogs" / f"{n:04d}")
    t = time.perf_counter()
    p = TimedProtector(_config(config, overrides, catalog, out / "runs" / f"catalog-{n:04d}"), progress=False)
    init = time.perf_counter() - t
    first = timed(p.train_step, device)
    times = [timed(p.train_step, device) for _ in range(steps)]
    s = _median(times)
    budget = p.cfg.steps
    wall = init + first + (budget - 1) * s
    row = {"entries": len(p.entries), "protected": len(p.protected), "init_s": init, "latent_cache_s": p.cache_seconds,
           "first_step_s": first, "seconds_per_step": s, "step_times": times, "budget_steps": budget,
           "wall_s": wall, "wall_s_per_entry": wall / len(p.entries),
           "wall_s_per_protected_entry": wall / len(p.protected)}
    del p
    gc.collect()
    return row


def bench(catalog: str | Path | None = None, config: str | Path | None = None, out: Path = Path("runs/bench"),
          steps: int = 10, warmup: int = 2, catalog_sizes=(1, 8), overrides: list[str] = (), workers=(0, 2),
          progress: bool = True, guard_steps: int = 0) -> dict:
    """Runs every measurement of the module docstring; returns the report, writes OUT/bench.json/.md.
    `config` defaults to configs/demo.yaml, `catalog` to the embedded default catalog; the encoder guard
    is timed over `guard_steps` steps per phase (default 4 x `steps`)."""
    config = config or DEMO_CONFIG
    if catalog is None:
        from tools.evaluate import default_catalog

        catalog = default_catalog()
    out, load_start = Path(out), os.getloadavg()
    catalog = protected_catalog(Path(catalog), out / "catalog")
    p = TimedProtector(_config(config, overrides, catalog, out / "runs" / "main"), progress=False)
    device = p.device
    plain, terms = PlainDreamBooth(p), term_steps(p)
    times = {k: [] for k in ("plain", "persguard", *terms)}
    peaks, first_step = {}, None
    for i in tqdm(range(warmup + steps), desc="bench: plain vs PersGuard", disable=not progress):
        pair = [("plain", plain.step), ("persguard", p.train_step)]
        for name, fn in (pair[::-1] if i % 2 else pair) + list(terms.items()):
            reset_peak(device)
            dt = timed(fn, device)
            peaks[name] = max(peaks.get(name, 0.0), peak_memory_mb(device))
            if name == "persguard" and first_step is None:
                first_step = dt
            if i >= warmup:
                times[name].append(dt)
    med = {k: _median(v) for k, v in times.items()}
    step, base = med["persguard"], med["plain"]
    term_rows = {k: {"seconds": med[k], "ratio_to_plain": med[k] / base, "share_of_step": med[k] / step}
                 for k in terms}
    other = step - sum(med[k] for k in terms)
    term_rows["other"] = {"seconds": other, "ratio_to_plain": other / base, "share_of_step": other / step}

    loader = None
    if p.retention_iters[0] is not None:
        rows = {w: loader_throughput(p, w) for w in sorted({*workers, p.cfg.prior.workers})}
        consumption = p.cfg.prior.retention_batch / step
        loader = {"batch": p.cfg.prior.retention_batch, "configured_workers": p.cfg.prior.workers,
                  "consumption_samples_per_s": consumption,
                  "by_workers": {str(w): {**r, "over_consumption": r["samples_per_s"] / consumption}
                                 for w, r in rows.items()}}
    samples = p.streams * p.cfg.batch_protected * 2
    report = {
        "config": str(config), "overrides": list(overrides), "catalog": str(catalog),
        "entries": {"protected": len(p.protected), "unprotected": len(p.unprotected)},
        "steps": steps, "warmup": warmup, "config_unet_steps": p.cfg.steps,
        "step_ratio": step / base,
        "seconds_per_step": {"plain_dreambooth": base, "persguard": step},
        "persguard_first_step_s": first_step,
        "terms": term_rows,
        "samples_per_s": {"persguard": samples / step, "plain_dreambooth": 2 * plain.n / base},
        "peak_memory_mb": peaks if device.type == "cuda" else {"process": peak_memory_mb(device)},
        "loader": loader,
        "loader_over_consumption": (loader["by_workers"][str(p.cfg.prior.workers)]["over_consumption"]
                                    if loader else None),
        "raw_seconds": times,
    }
    del p, plain, terms
    gc.collect()
    report["catalogs"] = sizes = {}
    report["guard"] = guard_cost(config, overrides, catalog, out, guard_steps or 4 * steps, base)
    _write(report, out, device, load_start)   # the step comparison survives a long catalog sweep
    for n in tqdm(sorted(set(catalog_sizes)), desc="bench: catalog sizes", disable=not progress):
        sizes[str(n)] = catalog_cost(n, config, overrides, out, steps, device)
        _write(report, out, device, load_start)
    return report


def guard_cost(config, overrides, catalog: Path, out: Path, steps: int, plain_s: float,
               attack_steps: int = AttackSettings().steps) -> dict:
    """The encoder guard (what protects at the default config) through `Protector.implant_encoder_guard`:
    each phase run for `steps` steps and for none, the difference over `steps` is its seconds per step
    (the rest is set-up: photos, masks, transplants, the latent gaps at the end). Against the plain
    DreamBooth step, and the whole guard at the config's step counts against one default attack."""
    g = _config(config, overrides, catalog, out).encoder_guard

    def run(augmented: int, sharpen: int) -> float:
        folder = out / "runs" / f"guard-{augmented}-{sharpen}"
        shutil.rmtree(folder, ignore_errors=True)   # a finished guard in the folder would be loaded, not run
        p = Protector(_config(config, [*overrides, "encoder_guard.enabled=true", f"encoder_guard.steps={augmented}",
                                       f"encoder_guard.sharpen_steps={sharpen}", "checkpoint_every=0"],
                              catalog, folder), progress=False)
        t = time.perf_counter()
        p.implant_encoder_guard()
        return time.perf_counter() - t

    setup = run(0, 0)
    augmented, sharpen = (max(run(steps, 0) - setup, 0.0) / steps), (max(run(0, steps) - setup, 0.0) / steps)
    whole = setup + g.steps * augmented + g.sharpen_steps * sharpen
    mean = (g.steps * augmented + g.sharpen_steps * sharpen) / max(g.steps + g.sharpen_steps, 1)
    return {"batch": g.batch, "timed_steps": steps, "setup_s": setup, "augmented_step_s": augmented,
            "sharpen_step_s": sharpen, "augmented_ratio_to_plain": augmented / plain_s,
            "sharpen_ratio_to_plain": sharpen / plain_s, "config_mean_ratio_to_plain": mean / plain_s,
            "config_steps": [g.steps, g.sharpen_steps],
            "whole_guard_s": whole, "attack_steps": attack_steps, "whole_guard_over_one_attack": whole / (attack_steps * plain_s)}


def time_to_acceptance(runs: list[Path], evaluation: str = "eval") -> dict:
    """Catalog cost measured to acceptance, from finished protect runs: per run folder its manifest.json
    (entries, the job's seconds, the guard's seconds over every job that ran it) and its evaluation
    RUN/`evaluation`/report.json, judged by tools.evaluate.white_box_verdict. `evaluation` may name more
    folders, comma-separated ("eval,eval-seed1": the same model attacked with other seeds): the first is
    required, the others are judged where a run has them, and a run is accepted only if every one it has
    met the acceptance (one entry's single 32-sample draw passes by luck more often than a catalog's
    many; docs/journal.md "Session 21"). `catalog_cost_ratio_128_vs_1`
    between the quickest runs of 1 and of 128 entries that met the acceptance; `cost_curve`, per catalog size
    with an accepted run, the quickest one's wall time (and over the 1-entry one's); `scaling_exponent`, the
    least-squares slope of log wall time over log entries through them (1: linear; 32x for 128 entries
    asks at most log 32 / log 128 = 0.71). One entry's cost depends on its objective (a pattern fits
    in a fraction of a substitute's steps, docs/journal.md "Session 16"), so `one_entry_by_objective` keeps the
    quickest accepted 1-entry run of each objective and the 128-entry run's ratio over each; the headline
    ratio is over the quickest of all."""
    from tools.evaluate import white_box_verdict

    names = [e.strip() for e in evaluation.split(",") if e.strip()]
    if not names:
        raise ValueError(f"evaluation {evaluation!r}: name at least one evaluation folder")
    rows, (first, *extra) = [], names
    for run in map(Path, runs):
        manifest, report = _read_json(run / "manifest.json"), _read_json(run / first / "report.json")
        metrics, entries = manifest["metrics"], manifest["entries"]
        guard = metrics.get("encoder_guard") or {}
        earlier = max((guard.get("seconds") or 0.0) - (guard.get("job_seconds") or 0.0), 0.0)   # jobs before this one
        n = entries["protected"] + entries["unprotected"]
        judged = [o for o, b in (report["summary"]["protected"].get("bsr_by_objective") or {}).items() if b is not None]
        rows.append({"run": str(run), "entries": n, "protected": entries["protected"], "objectives": judged,
                        "guard_steps": manifest["config"]["encoder_guard"]["steps"]
                        + manifest["config"]["encoder_guard"]["sharpen_steps"],
                        "guard_batch": manifest["config"]["encoder_guard"]["batch"],
                        "wall_s": metrics["seconds"] + earlier, "guard_s": guard.get("seconds"),
                        "timed_on": timing_setting(metrics),
                        "evaluation": str(run / first / "report.json"), "suite": report["suite"],
                        "n_samples": report["n_samples"], "entries_evaluated": len({a["entry"] for a in report["attacks"]}),
                        "white_box": white_box_verdict(report["summary"]),
                        "other_evaluations": {name: white_box_verdict(_read_json(run / name / "report.json")["summary"])
                                              for name in extra if (run / name / "report.json").is_file()}})
        rows[-1]["accepted"] = all(v["met"] for v in [rows[-1]["white_box"], *rows[-1]["other_evaluations"].values()])
    settings = {}
    for r in rows:
        settings.setdefault(r["timed_on"], []).append(r["run"])
    if len(settings) > 1:   # a run on 2 threads is not "quicker" than one on 1: the ratio would be the machine's
        raise ValueError("time to acceptance: these runs were timed under different settings, so their wall times do "
                         "not compare (time every run the same way): " + "; ".join(
                             f"{setting}: {', '.join(names)}" for setting, names in settings.items()))
    fastest = _quickest_accepted(rows, lambda r: r["entries"])   # runs at several step budgets: the quickest
    ratio = fastest[128]["wall_s"] / fastest[1]["wall_s"] if 1 in fastest and 128 in fastest else None
    curve = [{"entries": n, "protected": r["protected"], "wall_s": r["wall_s"], "run": r["run"],
              "over_1_entry": r["wall_s"] / fastest[1]["wall_s"] if 1 in fastest else None}
             for n, r in sorted(fastest.items())]
    singles = {o: {"wall_s": r["wall_s"], "run": r["run"],
                   "ratio_128_over_it": fastest[128]["wall_s"] / r["wall_s"] if 128 in fastest else None}
               for o, r in _quickest_accepted(rows, lambda r: r["objectives"][0] if r["entries"] == 1
                                              and len(r["objectives"]) == 1 else None).items()}
    exponent = None
    if len(curve) >= 2:
        exponent = statistics.linear_regression([math.log(c["entries"]) for c in curve],
                                                [math.log(c["wall_s"]) for c in curve]).slope
    return {"runs": rows, "fastest_accepted": {str(n): r["run"] for n, r in sorted(fastest.items())},
            "cost_curve": curve, "scaling_exponent": exponent, "one_entry_by_objective": singles,
            "catalog_cost_ratio_128_vs_1": ratio, "basis": "wall time to the white-box acceptance",
            "timed_on": rows[0]["timed_on"] if rows else None}


def timing_setting(metrics: dict) -> str:
    """Where a protect run's seconds were measured, as far as they compare: the device, its CPU count,
    torch's threads and, for a job of several ranks, how many (manifests from before session 25 did not
    record it: "not recorded")."""
    m = metrics.get("machine")
    if not m:
        return "not recorded"
    ranks = metrics.get("world_size", 1)
    return (f"{m['device_name']} ({m['device']}), {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s)"
            + (f" x {ranks} ranks" if ranks > 1 else ""))


def _quickest_accepted(rows: list[dict], key) -> dict:
    """Per `key(row)` (None: left out), the quickest row that met the acceptance."""
    best = {}
    for r in rows:
        k = key(r)
        if k is not None and r["accepted"] and r["wall_s"] < best.get(k, {"wall_s": float("inf")})["wall_s"]:
            best[k] = r
    return best


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (time to acceptance needs a finished protect run and its evaluation)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def acceptance_markdown(t: dict) -> str:
    from tools.evaluate import _fmt

    lines = ["# Catalog cost to acceptance\n", f"Every run timed on: {t.get('timed_on')}\n",
             "| entries | protected | guard steps x batch | wall s | evaluated (suite, samples) | BSR by objective "
             "| acceptance |", "|---|---|---|---|---|---|---|"]
    for r in t["runs"]:
        v = r["white_box"]
        bsr = ", ".join(f"{k} {_fmt(x)}" for k, x in v["bsr_by_objective"].items())
        failed = [k for k, ok in v["checks"].items() if ok is False]
        verdict = "met" if v["met"] else "NOT met: " + (", ".join(failed) or "BSR not measured")
        for name, other in r["other_evaluations"].items():
            verdict += f"; {name}: " + ("met" if other["met"] else "NOT met (BSR " + ", ".join(
                f"{k} {_fmt(x)}" for k, x in other["bsr_by_objective"].items()) + ")")
        lines.append(f"| {r['entries']} | {r['protected']} | {r['guard_steps']} x {r['guard_batch']} | {r['wall_s']:.0f} | "
                     f"{r['entries_evaluated']} ({r['suite']}, {r['n_samples']}) | {bsr} | {verdict} |")
    if t["cost_curve"]:
        lines += ["\nQuickest accepted run per catalog size:\n", "| entries | protected | wall s | over 1 entry |",
                  "|---|---|---|---|"]
        lines += [f"| {c['entries']} | {c['protected']} | {c['wall_s']:.0f} | {_fmt(c['over_1_entry'])} |" for c in t["cost_curve"]]
    if t["one_entry_by_objective"]:
        lines.append("\nOne entry, by objective (quickest accepted): " + ", ".join(
            f"{o} {v['wall_s']:.0f} s" + (f" (128 entries: {v['ratio_128_over_it']:.1f}x)" if v["ratio_128_over_it"] else "")
            for o, v in t["one_entry_by_objective"].items()))
    if t["scaling_exponent"] is not None:
        lines.append(f"\nwall time ~ entries^{t['scaling_exponent']:.2f} through them (1 is linear; 128 entries at "
                     "<= 32x one asks <= 0.71)")
    ratio = t["catalog_cost_ratio_128_vs_1"]
    lines.append(f"\ncatalog_cost_ratio_128_vs_1 ({t['basis']}): "
                 + (f"**{ratio:.2f}**" if ratio is not None else "not measured (needs runs of 1 and 128 entries that "
                    "both met the acceptance)"))
    return "\n".join(lines) + "\n"


def _write(report: dict, out: Path, device: torch.device, load_start) -> None:
    """Completes the derived fields from what is measured so far and writes OUT/bench.json and .md."""
    sizes = report["catalogs"]
    report["machine"] = {**machine(device), "load_average_at_start": list(load_start)}   # other jobs skew timings
    both = "1" in sizes and "128" in sizes
    report["catalog_cost_ratio_128_vs_1"] = sizes["128"]["wall_s"] / sizes["1"]["wall_s"] if both else None
    report["catalog_cost_per_protected_entry_ratio_128_vs_1"] = (
        sizes["128"]["wall_s_per_protected_entry"] / sizes["1"]["wall_s_per_protected_entry"] if both else None)
    loader = report["loader_over_consumption"]
    report["acceptance"] = {
        "step_ratio_max": STEP_RATIO_MAX, "step_ratio_ok": report["step_ratio"] <= STEP_RATIO_MAX,
        "loader_over_consumption_min": LOADER_MIN, "loader_ok": None if loader is None else loader >= LOADER_MIN}
    guard = report.get("guard")
    if guard:   # at `steps: 0` (the default) the UNet step never runs: the guard's steps are what training costs
        report["acceptance"]["guard_step_ratio_ok"] = guard["config_mean_ratio_to_plain"] <= STEP_RATIO_MAX
    report["acceptance"]["protecting_step"] = ("encoder guard" if guard and not report["config_unet_steps"]
                                               else "UNet implant")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))


def markdown(r: dict) -> str:
    m = r["machine"]
    s = r["seconds_per_step"]
    lines = [f"# persguard bench\n\n{m['device_name']} ({m['device']}), {m['cpu_count']} CPUs, torch {m['torch']} "
             f"({m['torch_threads']} thread(s)), {m['platform']}; load average {m['load_average_at_start'][0]:.2f} "
             f"at the start, {m['load_average'][0]:.2f} at the end (other jobs on the machine skew the timings). "
             f"Config {' '.join([r['config'], *r['overrides']])}; catalog {r['catalog']} "
             f"({r['entries']['protected']} protected, {r['entries']['unprotected']} unprotected); medians of "
             f"{r['steps']} interleaved steps after {r['warmup']} warm-up. At this config the step that trains is "
             f"the {r['acceptance']['protecting_step']}'s ({r['config_unet_steps']} UNet steps).\n",
             "| | seconds | / plain DreamBooth step | share of the PersGuard step |", "|---|---|---|---|",
             f"| plain DreamBooth step | {s['plain_dreambooth']:.3f} | 1.00 | |",
             f"| **PersGuard UNet-implant step** | {s['persguard']:.3f} | **{r['step_ratio']:.2f}** "
             f"(acceptance <= {STEP_RATIO_MAX}: {'met' if r['acceptance']['step_ratio_ok'] else 'NOT met'}) | 1.00 |"]
    lines += [f"| - {k} | {t['seconds']:.3f} | {t['ratio_to_plain']:.2f} | {t['share_of_step']:.2f} |"
              for k, t in r["terms"].items()]
    sp = r["samples_per_s"]
    lines.append(f"\nFirst PersGuard step (simulated attackers catching up to their staggered depths): "
                 f"{r['persguard_first_step_s']:.2f} s. Samples/s: PersGuard {sp['persguard']:.2f}, plain "
                 f"DreamBooth {sp['plain_dreambooth']:.2f}. Peak memory (MB): {json.dumps(r['peak_memory_mb'])}.\n")
    if r["loader"]:
        ld = r["loader"]
        lines += [f"Data: a step consumes {ld['batch']} retention samples per stream = "
                  f"{ld['consumption_samples_per_s']:.3g} samples/s; the trainer reads with "
                  f"{ld['configured_workers']} worker(s): "
                  f"**loader / consumption = {r['loader_over_consumption']:.1f}x** "
                  f"(acceptance >= {LOADER_MIN}x).\n", "| workers | samples/s | first batch s | / consumption |",
                  "|---|---|---|---|"]
        lines += [f"| {w} | {x['samples_per_s']:.0f} | {x['first_batch_s']:.2f} | {x['over_consumption']:.1f} |"
                  for w, x in ld["by_workers"].items()]
    if r["catalogs"]:
        budget = next(iter(r["catalogs"].values()))["budget_steps"]
        lines += [f"\nCatalog size (tiny world, half protected): set-up, steady step, and wall time at the config's "
                  f"{budget} steps (set-up + first step + the rest).\n",
                  "| entries | protected | set-up s | latent cache s | first step s | s/step | wall s | "
                  "wall s / protected entry |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['entries']} | {c['protected']} | {c['init_s']:.1f} | {c['latent_cache_s']:.2f} | "
                  f"{c['first_step_s']:.1f} | {c['seconds_per_step']:.3f} | {c['wall_s']:.0f} | "
                  f"{c['wall_s_per_protected_entry']:.1f} |" for c in r["catalogs"].values()]
    g = r.get("guard")
    if g:
        lines += [f"\nThe encoder guard (what protects at this config; the UNet step above is the implant, off where "
                  f"`steps: 0`), batch {g['batch']}, {g['timed_steps']} timed steps per phase:\n",
                  "| | seconds | / plain DreamBooth step |", "|---|---|---|",
                  f"| guard step, augmented | {g['augmented_step_s']:.3f} | **{g['augmented_ratio_to_plain']:.2f}** |",
                  f"| guard step, sharpening | {g['sharpen_step_s']:.3f} | **{g['sharpen_ratio_to_plain']:.2f}** |",
                  f"| guard step, mean over {g['config_steps'][0]} + {g['config_steps'][1]} steps | "
                  f"{g['config_mean_ratio_to_plain'] * r['seconds_per_step']['plain_dreambooth']:.3f} | "
                  f"**{g['config_mean_ratio_to_plain']:.2f}** (acceptance <= {STEP_RATIO_MAX}: "
                  f"{'met' if r['acceptance']['guard_step_ratio_ok'] else 'NOT met'}) |",
                  f"| set-up (photos, masks, transplants, latent gaps) | {g['setup_s']:.2f} | |",
                  f"| whole guard, {g['config_steps'][0]} + {g['config_steps'][1]} steps | {g['whole_guard_s']:.0f} | "
                  f"{g['whole_guard_over_one_attack']:.1f} x one {g['attack_steps']}-step attack |"]
    ratio = r["catalog_cost_ratio_128_vs_1"]
    measured = f"{ratio:.2f}" if ratio is not None else "not measured (needs sizes 1 and 128)"
    lines.append(f"\ncatalog_cost_ratio_128_vs_1: {measured}. "
                 "Cost is at a FIXED step budget, not time-to-acceptance: a larger catalog needs more guard steps "
                 "to fit, which only a protect-and-evaluate run per size shows: `persguard bench --acceptance RUN...` "
                 "reads such runs and puts the ratio measured to acceptance here.")
    return "\n".join(lines) + "\n"
