"""End to end: `persguard evaluate` writes the report SPEC section 5 promises, reproducibly."""
import json
import warnings

import pytest

from tools.cli import main


def _run(world_catalog, out, *extra):
    assert main(["evaluate", "--model", "tiny-sd", "--catalog", str(world_catalog), "--suite", "smoke",
                 "--samples", "4", "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_evaluate_writes_the_promised_report_and_reruns_reproduce_in_worker_processes(world_catalog, tmp_path):
    report = _run(world_catalog, tmp_path / "a")
    assert report["model"] == "tiny-sd" and report["suite"] == "smoke"
    assert len(report["attacks"]) == 3 * 2
    for a in report["attacks"]:
        for key in ("entry", "protected", "objective", "method", "settings", "ism", "identity_match",
                    "subject_detect", "bsr"):
            assert key in a
        assert 0 <= a["identity_match"] <= 1 and (tmp_path / "a" / a["grid"]).is_file()
    s = report["summary"]
    assert set(s) >= {"protected", "unprotected", "unrelated", "class_prompt", "clean"}
    assert s["protected"]["bsr"] is None and s["unprotected"]["fidelity_ratio"] is None  # nothing protected, no baseline
    assert s["unprotected"]["identity_match"] is not None and s["unrelated"]["identity_match"] is not None
    assert s["clean"]["frechet"] > 0 and 0 <= s["clean"]["class_accuracy"] <= 1
    assert "| person-catalog-0000 |" in (tmp_path / "a" / "report.md").read_text()

    # re-judged from its grids with the same evaluators: every metric and the summary come back
    from tools.score import EVALUATORS_DIR
    assert main(["rescore", str(tmp_path / "a"), "--evaluators", str(EVALUATORS_DIR), "--out", str(tmp_path / "r")]) == 0
    rescored = json.loads((tmp_path / "r" / "report.json").read_text())
    for k in ("ism", "identity_match", "subject_detect", "bsr"):   # bsr: None where nothing is protected
        got, want = [a[k] for a in rescored["attacks"]], [a[k] for a in report["attacks"]]
        assert [g is None for g in got] == [w is None for w in want], k
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=2e-3), k
    assert [a["before_rescore"]["identity_match"] for a in rescored["attacks"]] == [a["identity_match"] for a in report["attacks"]]
    assert rescored["summary"]["unrelated"] == pytest.approx(s["unrelated"], abs=1e-6)
    assert rescored["summary"]["unprotected"]["identity_match"] == pytest.approx(s["unprotected"]["identity_match"])
    assert (tmp_path / "r" / rescored["attacks"][0]["grid"]).is_file()

    # again, the attacks spread over two worker processes: the same records in the same order (the
    # workers' single thread sums in another order than this process's, hence the tolerance)
    again = _run(world_catalog, tmp_path / "b", "--workers", "2")
    assert [(a["entry"], a["settings"]) for a in again["attacks"]] == [(a["entry"], a["settings"]) for a in report["attacks"]]
    assert [a["ism"] for a in again["attacks"]] == pytest.approx([a["ism"] for a in report["attacks"]], abs=1e-3)


def test_evaluate_rejects_an_unknown_suite(world_catalog, tmp_path, capsys):
    assert main(["evaluate", "--catalog", str(world_catalog), "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_the_catalog_a_release_was_protected_from_is_read_from_its_run(tmp_path):
    from tools.evaluate import default_catalog, evaluate, run_catalog

    run = tmp_path / "run"
    (run / "protected").mkdir(parents=True)
    assert run_catalog(run / "protected") is None                     # no manifest
    assert run_catalog("tiny-sd") is None                             # a model name, not a release folder
    (run / "manifest.json").write_text(json.dumps({"config": {"catalog": "world/catalog.jsonl"}}))
    assert run_catalog(run / "protected") == "world/catalog.jsonl"
    with pytest.warns(UserWarning, match="protected from world/catalog.jsonl"), pytest.raises(ValueError):
        evaluate(str(run / "protected"), tmp_path / "out", suite="nope")   # warned before the suite is read
    (run / "manifest.json").write_text(json.dumps({"config": {"catalog": str(default_catalog())}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # made from the default: nothing to say
        with pytest.raises(ValueError, match="unknown suite"):
            evaluate(str(run / "protected"), tmp_path / "out", suite="nope")
    (run / "manifest.json").write_text("{not json")
    assert run_catalog(run / "protected") is None


@pytest.mark.slow
def test_the_curve_suite_judges_one_attack_at_every_length(world_catalog, tmp_path):
    assert main(["evaluate", "--model", "tiny-sd", "--catalog", str(world_catalog), "--suite", "smoke-curve",
                 "--samples", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted({(a["entry"], a["multiple"], a["settings"]["steps"]) for a in report["attacks"]}) == sorted(
        (e, m, s) for e in ("cat-catalog-0000", "person-catalog-0000", "person-catalog-0001")
        for m, s in ((0.5, 2), (1, 4), (2, 8)))
    points = report["summary"]["curve"]["points"]
    assert [p["multiple"] for p in points] == [0.5, 1, 2] and points[1]["steps"] == 4
    assert points[0]["protected_bsr"] is None and points[2]["unprotected_identity_match"] is not None
    assert "Protection against attack length" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_demo_leaves_the_promised_run_folder(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--suite", "smoke", "--samples", "2", "steps=2", "batch_protected=2",
                 "prior.retention_batch=2", "retention.slots=1", "logging.probe_samples=2",
                 "encoder_guard.steps=2", "encoder_guard.sharpen_steps=2", "encoder_guard.batch=2"]) == 0
    StableDiffusionPipeline.from_pretrained(out / "protected")
    report = json.loads((out / "report.json").read_text())
    objectives = {a["objective"] for a in report["attacks"] if a["protected"]}
    assert objectives == {"pattern", "erasure", "target"}
    assert {a["protected"] for a in report["attacks"]} == {True, False}
    assert report["baseline_attacks"] and report["diagnostics"]["attacker_loss"]["baseline"]
    assert set(report["diagnostics"]["encoder_gap"]["none"]) == {"pattern", "erasure", "target"}   # the smoke suite: no transform
    assert report["summary"]["clean"]["seed_spread"]["frechet"] > 0
    md = (out / "report.md").read_text()
    assert "Original vs protected model" in md and "where the backdoor lives" in md and "two seeds" in md
    assert "Encoder latent gap" in md
    assert (out / "catalog.jsonl").is_file() and list((out / "grids").glob("*.png"))

    # judged again reusing the original's attacks: the same report, without attacking the original twice
    again = ["evaluate", "--model", str(out / "protected"), "--baseline", "tiny-sd", "--catalog", report["catalog"],
             "--suite", "smoke", "--samples", "2", "--baseline-attacks", str(out / "report.json")]
    assert main([*again, "--out", str(tmp_path / "again")]) == 0
    reused = json.loads((tmp_path / "again" / "report.json").read_text())
    assert reused["baseline_attacks"] == report["baseline_attacks"]
    assert reused["baseline_attacks_from"] == str(out / "report.json")
    for key in ("identity_match", "fidelity_ratio"):
        assert reused["summary"]["unprotected"][key] == pytest.approx(report["summary"]["unprotected"][key]), key
    assert main([*again, "--seed", "1", "--out", str(tmp_path / "other-seed")]) == 2   # another seed's are refused
    assert f"{out / 'report.json'}: its baseline attacks are not this evaluation's: seed 0 (here 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_ablate_runs_each_variant_and_tabulates(tmp_path):
    from tools.demo import build_demo_catalog

    catalog = build_demo_catalog(tmp_path / "cat")
    lines = catalog.read_text().splitlines()
    judged = catalog.with_name("judged.jsonl")   # one protected and one unprotected entry
    judged.write_text(lines[0] + "\n" + lines[3] + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"catalog: {catalog}\nsteps: 1\nbatch_protected: 2\nprior: {{retention_batch: 2}}\n"
                      "retention: {slots: 1, inner_steps: 1}\nlogging: {probe_every: -1, wandb_mode: disabled}\n")
    assert main(["ablate", "--config", str(config), "--set", "unet-implant", "--out", str(tmp_path / "abl"),
                 "--suite", "smoke", "--samples", "2", "--only", "no-retention,second-order-restart",
                 "--eval-catalog", str(judged), "steps=1"]) == 0
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(rows) == ["original", "no-retention", "second-order-restart"]
    assert rows["no-retention"]["overrides"] == ["weights.retention=0"]
    assert 0 <= rows["second-order-restart"]["clean_class_accuracy"] <= 1 and rows["no-retention"]["protect_seconds"] > 0
    assert (tmp_path / "abl" / "no-retention" / "protected" / "model_index.json").is_file()
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| no-retention | weights.retention=0 |" in md and "[unet-implant]" in md and "judged on" in md
    report = tmp_path / "abl" / "no-retention" / "eval" / "report.json"
    judged_entries = {a["entry"] for a in json.loads(report.read_text())["attacks"]}
    assert judged_entries == {json.loads(lines[0])["id"], json.loads(lines[3])["id"]}
    stamp = report.stat().st_mtime_ns
    assert main(["ablate", "--config", str(config), "--set", "unet-implant", "--out", str(tmp_path / "abl"),
                 "--suite", "smoke", "--samples", "2", "--only", "no-retention", "--eval-catalog", str(judged),
                 "steps=1"]) == 0
    assert report.stat().st_mtime_ns == stamp   # a finished variant is not redone
    # the same runs read as catalog cost to acceptance (persguard bench --acceptance)
    runs = [str(tmp_path / "abl" / name) for name in ("no-retention", "second-order-restart")]
    assert main(["bench", "--acceptance", *runs, "--out", str(tmp_path / "cost")]) == 0
    t = json.loads((tmp_path / "cost" / "acceptance.json").read_text())
    assert [r["run"] for r in t["runs"]] == runs
    row = t["runs"][1]
    assert row["entries"] == len(lines) and row["entries_evaluated"] == 2
    assert row["wall_s"] > 0 and row["suite"] == "smoke" and set(row["white_box"]["checks"]) >= {"bsr_every_objective"}
    assert t["catalog_cost_ratio_128_vs_1"] is None and "not measured" in (tmp_path / "cost" / "acceptance.md").read_text()


def test_frechet_is_zero_for_identical_features_and_the_squared_shift_for_a_translation():
    import numpy as np

    from tools.evaluate import frechet

    a = np.random.default_rng(0).normal(size=(64, 8))
    assert 0.0 <= frechet(a, a) < 1e-9   # never sqrtm's round-off below zero
    assert frechet(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)


def test_clean_generation_is_within_the_seed_spread_only_when_no_farther_than_two_seeds_of_the_original():
    import numpy as np

    from tools.evaluate import seed_spread

    rng = np.random.default_rng(0)
    base, again = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    clean = lambda feats, acc: {"features": feats, "class_accuracy": acc}  # noqa: E731
    same = seed_spread(clean(base, 0.9), clean(base, 0.9), clean(again, 0.8))
    assert same["within"] and same["frechet"] > 0 and same["class_accuracy"] == pytest.approx(0.1)
    shifted = seed_spread(clean(base + 1.0, 0.9), clean(base, 0.9), clean(again, 0.8))
    assert not shifted["within"]                       # farther than a second seed is
    worse = seed_spread(clean(base, 0.5), clean(base, 0.9), clean(again, 0.8))
    assert not worse["within"] and worse["model_class_accuracy_gap"] == pytest.approx(0.4)
