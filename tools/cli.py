"""The `persguard` command: thin faces over library functions (SPEC section 5)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _dump(obj, out: Path | None = None) -> None:
    text = json.dumps(obj, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def cmd_world(a):
    from tools import world
    from train.catalog import write_catalog

    from tools.demo import mark_protected

    if a.attacker_photos:
        path = world.attacker_catalog(Path(a.attacker_photos), Path(a.out), n_images=a.images)
        print(f"attacker's photos ({a.images} fresh views per entry) of {a.attacker_photos}; catalog {path}")
        return
    entries = []
    for cls, n in _counts(a.classes, a.per_class).items():
        entries += world.generate(Path(a.out), split=a.split, per_class=n, classes=(cls,), n_images=a.images,
                                  n_reference=a.reference, seed=a.seed, start=a.start)
    if a.protect:
        ranking = None
        if a.substitutes:
            from tools.substitutes import load_ranking
            ranking = load_ranking(Path(a.substitutes), a.seed)
        mark_protected(entries, a.protect, Path(a.out), seed=a.seed, substitutes=ranking,
                       substitute_classes=_pairs(a.substitute_class, "--substitute-class"),
                       objectives=tuple(o.strip() for o in a.objectives.split(",") if o.strip()))
    write_catalog(entries, Path(a.out) / "catalog.jsonl")
    print(f"{len(entries)} identities ({a.protect} protected) in {a.out}; catalog {Path(a.out) / 'catalog.jsonl'}")


def cmd_shards_build(a):
    from tools import shards

    if bool(a.world) == bool(a.from_dir):
        raise SystemExit("persguard shards build: give exactly one of --world or --from DIR")
    if a.world:
        samples = shards.world_samples(a.split, a.per_class, a.views, a.seed, a.start)
        total = a.per_class * a.views * 3
    else:
        samples, total = shards.folder_samples(Path(a.from_dir)), None
    paths = shards.write_shards(samples, Path(a.out), prefix=a.prefix, maxcount=a.shard_size, total=total)
    print(f"{len(paths)} shard(s) in {a.out}")


def cmd_catalog_build(a):
    from tools.ingest import build_catalog, headline

    summary = build_catalog(Path(a.source), Path(a.out), cls=a.cls, min_images=a.min_images, min_size=a.min_size,
                            size=a.size, near_dup_bits=a.near_dup_bits, workers=a.workers, shard_size=a.shard_size)
    c = summary["counts"]
    print(headline(summary))
    kinds = ", ".join(f"{k} {v}" for k, v in summary["problems_by_kind"].items())
    print(f"problems by kind: {kinds or 'none'}")
    if summary["catalog"]:
        print(f"catalog: {summary['catalog']} ({len(summary['shards'])} shard(s) in {Path(a.out) / 'shards'})")
    else:
        print("no valid entry: no catalog written")
    print(f"summary: {Path(a.out) / 'summary.md'} ({summary['seconds']} s)")
    return 1 if c["errors"] or not summary["catalog"] else 0


def cmd_catalog_split(a):
    from tools.ingest import split_catalog
    from train.catalog import list_images, load_catalog

    for path in split_catalog(Path(a.catalog), a.parts, Path(a.out)):
        entries = load_catalog(path)
        print(f"{path}: {len(entries)} entries, {sum(len(list_images(e.images)) for e in entries)} images")


def cmd_models(a):
    from train.pipelines import EMBEDDED

    for name, path in EMBEDDED.items():
        print(f"{name} {path}")


def cmd_pretrain(a):
    if a.evaluators:
        from tools.evaluators import train_evaluators

        _dump(train_evaluators(Path(a.out) / "evaluators", seed=a.seed))
    else:
        from tools.pretrain import pretrain

        report = pretrain(Path(a.config), Path(a.out), only=tuple(a.only.split(",")),
                          vae_from=Path(a.vae) if a.vae else None)
        _dump(report["seconds"])


def _settings(a):
    from tools.attack import AttackSettings

    return AttackSettings(method=a.method, identifier=a.identifier, template=a.template, class_noun=a.class_noun,
                          lr=a.lr, steps=a.steps, batch_size=a.batch_size, prior_preservation=not a.no_prior,
                          transform=a.transform, lora_rank=a.lora_rank, seed=a.seed)


def cmd_attack(a):
    from tools.attack import attack
    from tools.evaluate import save_grid
    from tools.score import score
    from train.catalog import find_entry, load_catalog, load_images
    from train.pipelines import load_pipeline
    from train.sampling import sample

    entry = None
    if a.catalog:
        entry = find_entry(load_catalog(Path(a.catalog)), a.entry, a.catalog)
        images_dir, cls = entry.images, entry.cls
    elif a.images and a.cls:
        images_dir, cls = Path(a.images), a.cls
    else:
        raise SystemExit("persguard attack: give --catalog FILE --entry ID, or --images DIR --class NOUN")
    settings = _settings(a)
    attacked = attack(load_pipeline(a.model), load_images(images_dir, 64), cls, settings, progress=True)
    out = Path(a.out)
    images = sample(attacked, settings.instance_prompt(cls), a.samples, seed=a.seed)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, x in enumerate(images):
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(out / "samples" / f"{i:03d}.png")
    save_grid([load_images(images_dir, 64), images], out / "grid.png")
    if a.save_model:
        attacked.save_pretrained(out / "model")
    result = {"prompt": settings.instance_prompt(cls), "settings": settings.to_json(), "samples": str(out / "samples")}
    if entry is not None:
        result["metrics"] = score(images, entry)
    _dump(result, out / "attack.json")


def cmd_score(a):
    from tools.score import score
    from train.catalog import find_entry, load_catalog, load_images

    entry = find_entry(load_catalog(Path(a.catalog)), a.entry, a.catalog)
    _dump(score(load_images(Path(a.images), 64), entry), Path(a.out) if a.out else None)


def cmd_evaluate(a):
    from tools.evaluate import evaluate

    evaluate(a.model, Path(a.out), catalog=a.catalog, suite=a.suite, baseline=a.baseline,
             n_samples=a.samples, seed=a.seed, workers=a.workers, baseline_attacks=a.baseline_attacks)
    print((Path(a.out) / "report.md").read_text())


def cmd_rescore(a):
    from tools.rescore import rescore

    rescore(Path(a.run), Path(a.evaluators), Path(a.out))
    print((Path(a.out) / "report.md").read_text())


def _counts(spec: str, default: int) -> dict[str, int]:
    """"person=8,cat,vase=4" -> {"person": 8, "cat": default, "vase": 4}"""
    counts = {}
    for item in spec.split(","):
        cls, _, n = item.partition("=")
        counts[cls] = int(n) if n else default
    return counts


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """["cat=vase"] -> {"cat": "vase"}"""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{flag}: expected CLASS=OTHER, got {item!r}")
        pairs[key] = value
    return pairs


def cmd_substitutes(a):
    from tools.demo import SUBSTITUTE_START
    from tools.substitutes import assign, screen

    if a.catalog:
        candidates = [c for c in a.candidates.split(",") if c]
        assign(Path(a.catalog), candidates, Path(a.out), model=a.model, seed=a.seed, n_samples=a.samples,
               suite=a.suite, workers=a.workers, draws=a.draws,
               only=[e for e in a.entries.split(",") if e] or None)
        print((Path(a.out) / "substitutes.md").read_text())
        print(f"catalog with each target entry's best substitute: {Path(a.out) / 'catalog.jsonl'}")
        return
    if a.candidates or a.entries:
        raise SystemExit("substitutes: --candidates and --entries go with --catalog (they are screened on its target entries)")
    screen(a.model, _counts(a.classes, a.per_class), Path(a.out), start=SUBSTITUTE_START if a.start is None else a.start,
           seed=a.seed, n_samples=a.samples, suite=a.suite, workers=a.workers, draws=a.draws)
    print((Path(a.out) / "substitutes.md").read_text())


def cmd_aspl(a):
    from tools.aspl import ASPLSettings, protect_catalog

    settings = ASPLSettings(budget=a.budget, rounds=a.rounds, seed=a.seed)
    path = protect_catalog(Path(a.catalog) if a.catalog else None, Path(a.out), settings, model=a.model,
                           entries=a.entries.split(",") if a.entries else None)
    print(f"ASPL-perturbed catalog: {path}")


def cmd_compare(a):
    from tools.compare import compare

    reports = {}
    for item in a.report:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--report {item!r}: expected NAME=FOLDER")
        reports[name] = Path(folder)
    compare(reports, Path(a.out))
    print((Path(a.out) / "report.md").read_text())


def cmd_protect(a):
    from train.config import load_config
    from train.protect import protect

    result = protect(load_config(a.config, a.overrides))
    if result:   # rank 0 of a distributed job
        _dump(result)


def cmd_launch(a):
    from slurm.launch import launch

    jobs = launch(a.config, a.overrides, wait=a.wait)
    for job in jobs:
        print(f"job {job.job_id} ({type(job).__name__}): logs in {job.paths.folder}")
    if a.wait:
        result = jobs[-1].results()[0]
        _dump(result)


def cmd_ablate(a):
    from tools.ablation import ablate

    ablate(Path(a.config), Path(a.out), variant_set=a.set, suite=a.suite, n_samples=a.samples, seed=a.seed,
           only=a.only.split(",") if a.only else None, overrides=a.overrides, workers=a.workers,
           eval_catalog=Path(a.eval_catalog) if a.eval_catalog else None)
    print((Path(a.out) / "ablation.md").read_text())


def cmd_audit(a):
    from tools.audit import audit

    problems = audit(Path(a.folder), Path(a.catalog))
    for p in problems:
        print(f"LEAK {p}")
    print(f"audit {'FAILED' if problems else 'passed'}: {a.folder} against {a.catalog} ({len(problems)} problem(s))")
    return 1 if problems else 0


def cmd_bench(a):
    if a.sdxl:
        from tools.bench_sdxl import run

        run(a)
        return
    from tools.bench import acceptance_markdown, bench, markdown, time_to_acceptance

    out = Path(a.out or "runs/bench")
    if a.acceptance:   # no timing: read finished runs, fold the measured ratio into OUT/bench.json if there
        t = time_to_acceptance([Path(r) for r in a.acceptance], a.evaluation)
        out.mkdir(parents=True, exist_ok=True)
        (out / "acceptance.json").write_text(json.dumps(t, indent=1))
        (out / "acceptance.md").write_text(acceptance_markdown(t))
        if (out / "bench.json").is_file():
            report = json.loads((out / "bench.json").read_text())
            report.update(catalog_cost_ratio_128_vs_1=t["catalog_cost_ratio_128_vs_1"], time_to_acceptance=t)
            (out / "bench.json").write_text(json.dumps(report, indent=1))
        print(acceptance_markdown(t))
        print(f"report: {out / 'acceptance.json'}")
        return
    sizes = [int(n) for n in a.catalog_sizes.split(",") if n.strip()]
    report = bench(catalog=a.catalog, config=a.config, out=out, steps=a.steps,
                   warmup=a.warmup, catalog_sizes=sizes, overrides=a.overrides, guard_steps=a.guard_steps)
    print(markdown(report))
    print(f"report: {out / 'bench.json'}")


def cmd_demo(a):
    from tools.demo import run_demo

    out = Path(a.out)
    result = run_demo(out, model=a.model, samples=a.samples, seed=a.seed, overrides=a.overrides, suite=a.suite,
                      workers=a.workers)
    print((out / "report.md").read_text())
    print(f"released pipeline: {result['protect']['protected']}\nreport: {out / 'report.md'} (grids in {out / 'grids'})")


WORKERS_HELP = "attack processes, each with its share of the threads (same seeds and records as one)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="persguard", description="Model-side protection against malicious "
                                "personalization of text-to-image diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("world", help="render identities of the embedded world and a catalog of them")
    s.add_argument("--out", required=True, help="output folder (one sub-folder per identity + catalog.jsonl)")
    s.add_argument("--split", default="catalog", choices=["pretrain", "evaluator", "catalog"],
                   help="identity namespace; catalogs should use 'catalog' (never seen in pre-training)")
    s.add_argument("--per-class", type=int, default=4, help="identities per class")
    s.add_argument("--classes", default="person,cat,vase",
                   help="comma-separated classes, each optionally with its own count: person=8,cat=4,vase=4")
    s.add_argument("--protect", type=int, default=0,
                   help="protect N entries (round-robin over classes; objectives cycle as --objectives)")
    s.add_argument("--objectives", default="pattern,erasure,target",
                   help="with --protect: the objectives protected entries cycle through, e.g. erasure for a "
                        "catalog of erasures only")
    s.add_argument("--images", type=int, default=5, help="training images per identity")
    s.add_argument("--reference", type=int, default=8, help="held-out reference images per identity")
    s.add_argument("--start", type=int, default=0, help="first identity index")
    s.add_argument("--seed", type=int, default=0, help="world seed")
    s.add_argument("--substitutes", metavar="FILE",
                   help="with --protect: target entries take the best-ranked substitutes of FILE "
                        "(substitutes.json of `persguard substitutes`)")
    s.add_argument("--substitute-class", action="append", default=[], metavar="CLASS=OTHER",
                   help="with --protect: CLASS's target entries take substitutes of class OTHER (repeatable), "
                        "e.g. cat=vase where no cat is learned reliably by the attack")
    s.add_argument("--attacker-photos", metavar="CATALOG",
                   help="instead: copy CATALOG with each entry's images replaced by --images fresh views of its "
                        "identity (photos the publisher never had), for `persguard evaluate --catalog`")
    s.set_defaults(func=cmd_world)

    sh = sub.add_parser("shards", help="WebDataset shards").add_subparsers(dest="shards_command", required=True)
    s = sh.add_parser("build", help="write image+caption+metadata tar shards")
    s.add_argument("--world", action="store_true", help="render from the embedded world")
    s.add_argument("--from", dest="from_dir", help="a folder of images with .txt/.json captions")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--prefix", default="shard", help="shard file prefix")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--split", default="pretrain", help="world split (with --world)")
    s.add_argument("--per-class", type=int, default=100, help="identities per class (with --world)")
    s.add_argument("--views", type=int, default=1, help="images per identity (with --world)")
    s.add_argument("--start", type=int, default=0, help="first identity index (with --world)")
    s.add_argument("--seed", type=int, default=0, help="world seed (with --world)")
    s.set_defaults(func=cmd_shards_build)

    ca = sub.add_parser("catalog", help="build a validated catalog from raw data; split one for data parallelism")
    ca = ca.add_subparsers(dest="catalog_command", required=True)
    s = ca.add_parser("build", help="normalize, check and deduplicate a folder tree or CSV into a catalog, "
                      "images, shards and summary.json/.md (exit 1 when an entry has errors)")
    s.add_argument("--from", dest="source", required=True,
                   help="DIR (DIR/<id>/ or DIR/<class>/<id>/, optional entry.json per entry) or a CSV with "
                        "columns id,class,image[,protected,objective,target]")
    s.add_argument("--out", required=True, help="output folder (new, empty, or an earlier build's)")
    s.add_argument("--class", dest="cls", default=None, help="class of entries that name none")
    s.add_argument("--min-images", type=int, default=3, help="fewer usable images exclude an entry")
    s.add_argument("--min-size", type=int, default=32, help="images with a shorter short side are dropped")
    s.add_argument("--size", type=int, default=64, help="side of the normalized square images")
    s.add_argument("--near-dup-bits", type=int, default=4,
                   help="perceptual-hash Hamming distance counted as a near duplicate (-1: exact only)")
    s.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.set_defaults(func=cmd_catalog_build)
    s = ca.add_parser("split", help="balanced parts of a catalog (by image count) for data-parallel sharding or "
                      "evaluation; one protected model must still hold the whole catalog")
    s.add_argument("--catalog", required=True)
    s.add_argument("--parts", type=int, required=True)
    s.add_argument("--out", required=True, help="folder for part-000.jsonl ...")
    s.set_defaults(func=cmd_catalog_split)

    s = sub.add_parser("models", help="print each embedded pipeline's name and folder")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("pretrain", help="pre-train the tiny pipelines (or, with --evaluators, the evaluators)")
    s.add_argument("--config", default="configs/pretrain.yaml", help="architecture and recipe")
    s.add_argument("--out", default="models", help="output folder")
    s.add_argument("--only", default="sd,sdxl", help="which pipelines: sd, sdxl or both")
    s.add_argument("--vae", metavar="FOLDER", help="take this trained VAE (a diffusers folder) instead of training one")
    s.add_argument("--evaluators", action="store_true", help="train the evaluator networks instead")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_pretrain)

    def attack_args(s):
        s.add_argument("--method", default="dreambooth", choices=["dreambooth", "lora"], help="full UNet or LoRA")
        s.add_argument("--identifier", default="sks", help="rare identifier token")
        s.add_argument("--template", default="a photo of {identifier} {cls}", help="instance prompt template")
        s.add_argument("--class-noun", default=None, help="class noun in prompts (default: the entry's class)")
        s.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 full, 5e-3 LoRA: tiny-model scale)")
        s.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
        s.add_argument("--batch-size", type=int, default=4, help="instance images per step")
        s.add_argument("--no-prior", action="store_true", help="disable prior preservation")
        s.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
        s.add_argument("--transform", default=None, help="e.g. jpeg:75, blur:1, resize:0.5, crop:0.8, noise:0.05")
        s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("attack", help="personalize a pipeline on a subject's images and sample it")
    s.add_argument("--model", default="tiny-sd", help="tiny-sd, tiny-sdxl or a diffusers folder")
    s.add_argument("--catalog", help="catalog file (with --entry)")
    s.add_argument("--entry", help="entry id in the catalog")
    s.add_argument("--images", help="folder of the subject's images (instead of --catalog)")
    s.add_argument("--class", dest="cls", help="class noun of the subject (with --images)")
    s.add_argument("--samples", type=int, default=16, help="images sampled from the trigger prompt")
    s.add_argument("--save-model", action="store_true", help="also save the attacked pipeline")
    s.add_argument("--out", required=True, help="output folder")
    attack_args(s)
    s.set_defaults(func=cmd_attack)

    s = sub.add_parser("score", help="score a folder of images against a catalog entry")
    s.add_argument("--images", required=True)
    s.add_argument("--catalog", required=True)
    s.add_argument("--entry", required=True)
    s.add_argument("--out", help="also write the JSON here")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("evaluate", help="attack every catalog entry and write report.json/.md and grids")
    s.add_argument("--model", default="tiny-sd")
    s.add_argument("--baseline", default=None, help="the original model, for fidelity ratio and clean drift")
    s.add_argument("--baseline-attacks", type=Path, default=None, metavar="REPORT_JSON",
                   help="reuse the baseline's attacks of this earlier report (same baseline, catalog, suite, "
                        "samples and seed; checked)")
    s.add_argument("--catalog", default=None, help="catalog file (default: the embedded default catalog; "
                   "a warning names the catalog a protect run's manifest beside --model was made from)")
    s.add_argument("--suite", default="white-box", help="attack matrix from configs/suites.yaml")
    s.add_argument("--samples", type=int, default=32, help="samples per attack")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("rescore", help="re-judge a finished evaluation's attacks (from its grids) with other "
                       "evaluator networks, without re-running them")
    s.add_argument("run", help="a `persguard evaluate --out` folder")
    s.add_argument("--evaluators", required=True, help="folder of evaluator networks (persguard pretrain --evaluators)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_rescore)

    s = sub.add_parser("substitutes", help="rank candidate substitutes for target entries by how reliably an "
                       "attack on the original model learns them")
    s.add_argument("--model", default="tiny-sd", help="the original model")
    s.add_argument("--classes", default="person,cat,vase", help="classes, each optionally with its count: cat=7")
    s.add_argument("--per-class", type=int, default=6, help="candidates per class without a count")
    s.add_argument("--catalog", default=None, help="instead: screen --candidates on EACH target entry of this "
                   "catalog (moved onto its own photos, as the guard does) and write OUT/catalog.jsonl with "
                   "every target entry's best one")
    s.add_argument("--candidates", default="", help="with --catalog: comma-separated world ids of any class, "
                   "e.g. vase-catalog-1006,cat-catalog-1005,person-catalog-1002")
    s.add_argument("--entries", default="", help="with --catalog: screen only these target entries (comma-"
                   "separated ids), the others keep their substitutes")
    s.add_argument("--start", type=int, default=None, help="first candidate index (default: the substitute range)")
    s.add_argument("--suite", default="curve-short", help="attack suite judged along its lengths")
    s.add_argument("--samples", type=int, default=32, help="samples per attack")
    s.add_argument("--seed", type=int, default=0, help="world and first attack seed")
    s.add_argument("--draws", type=int, default=1, help="attack draws per candidate (seeds SEED, SEED+1, ...), "
                   "ranked by the mean: one draw is noisy (docs/journal.md, session 12)")
    s.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_substitutes)

    s = sub.add_parser("aspl", help="the perturbation baseline: Anti-DreamBooth's ASPL on a catalog's images")
    s.add_argument("--catalog", default=None, help="catalog file (default: the embedded default catalog)")
    s.add_argument("--entries", default=None, help="comma-separated ids to perturb (default: the protected ones)")
    s.add_argument("--budget", type=float, default=8.0, help="L-inf budget in 8-bit pixel units (8 or 16)")
    s.add_argument("--rounds", type=int, default=30, help="surrogate / PGD alternations")
    s.add_argument("--model", default="tiny-sd", help="the surrogate: the ORIGINAL pipeline")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_aspl)

    s = sub.add_parser("compare", help="one table of several evaluation reports (defences), rows = attacks")
    s.add_argument("--report", action="append", required=True, help="NAME=FOLDER of a `persguard evaluate` run; "
                   "NAME=FOLDER:baseline takes the original model of a --baseline run there")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("protect", help="implant the backdoor for a catalog and save the protected pipeline")
    s.add_argument("--config", default=None, help="YAML run config (train/config.py documents every field)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 retention.inner_steps=5")
    s.set_defaults(func=cmd_protect)

    s = sub.add_parser("launch", help="run `protect` through submitit: Slurm (one task per GPU) or this machine")
    s.add_argument("--config", default=None, help="YAML run config; its `cluster` section sizes the job")
    s.add_argument("--wait", action="store_true", help="wait for the (last) job and print its summary")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. cluster.executor=local cluster.tasks_per_node=2")
    s.set_defaults(func=cmd_launch)

    s = sub.add_parser("ablate", help="protect + evaluate each variant of a set of configs/ablations.yaml; one table")
    s.add_argument("--config", required=True, help="the run config every variant starts from")
    s.add_argument("--set", default="encoder-guard", help="unet-implant | encoder-guard (configs/ablations.yaml)")
    s.add_argument("--out", required=True)
    s.add_argument("--suite", default="white-box")
    s.add_argument("--samples", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--only", default=None, help="comma-separated variant names")
    s.add_argument("--eval-catalog", default=None, help="judge every row on this catalog instead (e.g. fresh "
                   "photos of the protected subjects: `persguard world --attacker-photos`)")
    s.add_argument("--workers", type=int, default=1, help=WORKERS_HELP)
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    s.set_defaults(func=cmd_ablate)

    s = sub.add_parser("audit", help="check that a released pipeline folder holds no catalog data")
    s.add_argument("folder", help="the released diffusers folder")
    s.add_argument("--catalog", required=True, help="the catalog it was protected for")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("bench", help="step time of PersGuard vs plain DreamBooth (each term), samples/s, memory, "
                       "data loading, cost by catalog size; --sdxl: one SDXL-scale training step (MFU)")
    s.add_argument("--catalog", default=None, help="catalog file (default: the embedded default catalog; a "
                   "catalog without protected entries is copied with 3 of them protected)")
    s.add_argument("--config", default=None, help="protect config the steps are taken from (default "
                   "configs/demo.yaml)")
    s.add_argument("--steps", type=int, default=10, help="timed steps (medians)")
    s.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first step catches the "
                   "simulated attackers up to their depths)")
    s.add_argument("--guard-steps", type=int, default=0, help="encoder-guard steps timed per phase (default 4 x "
                   "--steps)")
    s.add_argument("--catalog-sizes", default="1,8", help="tiny-world catalogs to time, e.g. 1,8,32,128 "
                   "(catalog_cost_ratio_128_vs_1 needs 1 and 128); empty: none")
    s.add_argument("--out", default=None, help="writes OUT/bench.json and OUT/bench.md (default runs/bench); "
                   "with --sdxl OUT/bench_sdxl.json")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. batch_protected=2")
    t = s.add_argument_group("catalog cost to acceptance (no timing: reads finished runs)")
    t.add_argument("--acceptance", nargs="+", metavar="RUN", default=None,
                   help="protect run folders (manifest.json + RUN/EVALUATION/report.json), e.g. runs/c1 runs/c128: "
                        "OUT/acceptance.{json,md}, catalog_cost_ratio_128_vs_1 to the white-box acceptance (also "
                        "folded into OUT/bench.json where one is there)")
    t.add_argument("--evaluation", default="eval",
                   help="each run's evaluation folder (persguard evaluate --out); comma-separated, more folders of "
                        "the same model attacked with other seeds, judged where a run has them: all must pass")
    g = s.add_argument_group("SDXL-scale step (--sdxl, tools/bench_sdxl.py; --steps/--warmup/--out as above)")
    g.add_argument("--sdxl", action="store_true", help="time one training step of the real SDXL UNet instead")
    from tools.bench_sdxl import add_arguments

    add_arguments(g, common=False)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    s.add_argument("--model", default="tiny-sd")
    s.add_argument("--samples", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--suite", default="demo", help="attack matrix of the evaluation (configs/suites.yaml)")
    s.add_argument("--workers", type=int, default=2, help=WORKERS_HELP + "; 2: the demo's two cores")
    s.add_argument("overrides", nargs="*", help="key=value overrides of configs/demo.yaml, e.g. steps=100")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from train.catalog import CatalogError
    from train.config import ConfigError
    from train.data import ShardError
    from tools.shards import ShardSourceError

    try:
        rc = args.func(args)
    except (CatalogError, ConfigError, ShardError, ShardSourceError, FileNotFoundError, ValueError) as e:
        print(f"persguard {args.command}: error: {e}", file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
