"""`persguard bench` and the SDXL-scale step (tools/bench.py, tools/bench_sdxl.py) on CPU: the report's
contract and what must hold on any machine; the timings themselves are the machine's."""
import json
import math

import pytest
import torch

from tools import bench_sdxl
from tools.bench import TERMS, protected_catalog, world_catalog
from tools.cli import main
from train.catalog import load_catalog

# a PersGuard step with every term, at the smallest sizes (seconds, not minutes, on 2 CPU cores)
FAST = ["batch_protected=1", "batch_unprotected=1", "prior.retention_batch=2", "retention.slots=1",
        "retention.horizon=2", "retention.unprotected_slots=1"]


def test_world_catalog_protects_half_and_is_rendered_once(tmp_path):
    path = world_catalog(4, tmp_path / "four")
    entries = load_catalog(path)
    assert [e.cls for e in entries] == ["person", "person", "cat", "vase"]
    assert [e.id for e in entries if e.protected] == [entries[0].id, entries[2].id]   # round-robin over classes
    stamp = path.stat().st_mtime_ns
    assert world_catalog(4, tmp_path / "four") == path and path.stat().st_mtime_ns == stamp
    one = load_catalog(world_catalog(1, tmp_path / "one"))
    assert len(one) == 1 and one[0].protected


def test_a_catalog_without_protected_entries_is_copied_with_some_protected(world_catalog, tmp_path):
    copy = protected_catalog(world_catalog, tmp_path / "copy")
    entries = load_catalog(copy)
    assert copy != world_catalog and [e.id for e in entries] == [e.id for e in load_catalog(world_catalog)]
    assert sum(e.protected for e in entries) == 2 and all(e.images.is_dir() for e in entries)   # one stays unprotected
    assert protected_catalog(copy, tmp_path / "again") == copy


@pytest.mark.slow
def test_bench_times_each_term_against_a_plain_dreambooth_step(world_catalog, tmp_path, capsys):
    assert main(["bench", "--catalog", str(world_catalog), "--steps", "2", "--warmup", "1", "--catalog-sizes", "1",
                 "--guard-steps", "4", "--out", str(tmp_path), *FAST]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["entries"] == {"protected": 2, "unprotected": 1}
    # a PersGuard step holds a plain step's worth of work several times over (behaviour, prior, one
    # simulated attacker step and one backdoor loss per slot, each a forward and a backward)
    assert r["step_ratio"] > 1 and r["seconds_per_step"]["plain_dreambooth"] > 0
    assert set(r["terms"]) == {*TERMS, "other"}
    assert all(r["terms"][k]["seconds"] > 0 and len(r["raw_seconds"][k]) == 2 for k in TERMS)
    assert r["samples_per_s"]["persguard"] > 0 and r["peak_memory_mb"]["process"] > 0
    assert set(r["loader"]["by_workers"]) == {"0", "2"} and r["loader_over_consumption"] > 0
    assert r["loader_over_consumption"] == r["loader"]["by_workers"]["0"]["over_consumption"]   # prior.workers 0
    assert r["machine"]["torch"] == torch.__version__ and r["machine"]["cpu_count"] >= 1
    one = r["catalogs"]["1"]
    assert one["entries"] == one["protected"] == 1 and one["seconds_per_step"] > 0 and one["latent_cache_s"] > 0
    assert one["wall_s"] == pytest.approx(one["init_s"] + one["first_step_s"]
                                          + (one["budget_steps"] - 1) * one["seconds_per_step"])
    g = r["guard"]   # the encoder guard, timed through protect's own implant_encoder_guard
    assert g["augmented_step_s"] > 0 and g["sharpen_step_s"] > 0 and g["timed_steps"] == 4
    assert g["augmented_ratio_to_plain"] == pytest.approx(g["augmented_step_s"] / r["seconds_per_step"]["plain_dreambooth"])
    assert g["whole_guard_s"] == pytest.approx(g["setup_s"] + g["config_steps"][0] * g["augmented_step_s"]
                                               + g["config_steps"][1] * g["sharpen_step_s"])
    lo, hi = sorted((g["augmented_ratio_to_plain"], g["sharpen_ratio_to_plain"]))
    assert lo <= g["config_mean_ratio_to_plain"] <= hi   # the two phases weighted by the config's step counts
    assert "guard step, augmented" in (tmp_path / "bench.md").read_text()
    # the default config trains no UNet step, so its cost is judged on the guard's steps
    assert r["config_unet_steps"] == 0 and r["acceptance"]["protecting_step"] == "encoder guard"
    assert r["acceptance"]["guard_step_ratio_ok"] == (g["config_mean_ratio_to_plain"] <= 3.0)
    assert r["catalog_cost_ratio_128_vs_1"] is None   # 128 was not measured
    assert "not time-to-acceptance" in (tmp_path / "bench.md").read_text()
    assert "PersGuard step" in capsys.readouterr().out


def test_the_sdxl_config_is_the_published_unet():
    r = bench_sdxl.count_flops(bench_sdxl.SDXL_UNET, batch=1, resolution=1024)
    assert r["params"] == 2_567_463_684   # stabilityai/stable-diffusion-xl-base-1.0's UNet
    assert 6e12 < r["forward_flops"] < 8e12
    assert 2.5 < r["flops_per_step"] / r["forward_flops"] < 3.5   # backward: gradients of inputs and weights


def test_reduced_sdxl_step_on_cpu_times_a_step_and_counts_flops_linear_in_batch(tmp_path):
    one = bench_sdxl.bench_sdxl(reduced=True, batch=1, steps=1, warmup=0, out=tmp_path, progress=False)
    assert one["unet"] == "sdxl-base-reduced" and one["latent"] == [4, 16, 16] and one["dtype"] == "fp32"
    assert one["flops_per_step"] > 0 and one["step_s"] > 0 and one["peak_memory_mb"] > 0
    assert one["mfu"] is None and one["achieved_flops_per_s"] > 0   # no GPU peak to divide by
    assert json.loads((tmp_path / "bench_sdxl.json").read_text())["flops_per_step"] == one["flops_per_step"]
    two = bench_sdxl.count_flops(bench_sdxl.REDUCED_UNET, batch=2, resolution=128)
    assert two["flops_per_step"] == pytest.approx(2 * one["flops_per_step"], rel=0.01)


def test_bench_sdxl_through_the_cli(tmp_path, capsys):
    assert main(["bench", "--sdxl", "--reduced", "--flops-only", "--batch", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench_sdxl.json").read_text())
    assert r["batch"] == 2 and r["flops_per_step"] > 0 and "step_s" not in r
    assert "FLOP per step" in capsys.readouterr().out


def test_the_sdxl_matrix_records_each_row_and_a_failing_knob_does_not_stop_it(tmp_path):
    rows = [{"batch": 1}, {"batch": 1, "attention": "xformers"}, {"batch": 2, "channels_last": True}]
    results = bench_sdxl.matrix(reduced=True, rows=rows, steps=1, warmup=0, out=tmp_path)
    assert [r["batch"] for r in results] == [1, 1, 2] and "xformers needs a CUDA device" in results[1]["error"]
    assert results[0]["step_s"] > 0 and results[2]["channels_last"] and results[2]["step_s"] > 0
    assert results[2]["flops_per_step"] == pytest.approx(2 * results[0]["flops_per_step"], rel=0.01)
    assert json.loads((tmp_path / "bench_sdxl_matrix.json").read_text()) == results
    table = (tmp_path / "bench_sdxl_matrix.md").read_text()
    assert table.count("\n| ") == 4 and "channels-last" in table and "xformers needs a CUDA device" in table
    late = bench_sdxl.matrix(reduced=True, rows=rows[:2], steps=1, warmup=0, deadline_s=0.0)
    assert [r.get("skipped", "") for r in late] == ["past the 0 s deadline"] * 2


def _finished_run(folder, protected, unprotected, seconds, guard=None, bsr=1.0, identity=0.0, objectives=None,
                  threads=None, ranks=None):
    folder.mkdir(parents=True)
    config = {"encoder_guard": {"steps": 800, "sharpen_steps": 800, "batch": 16}}
    metrics = {"seconds": seconds, "encoder_guard": guard, **({"world_size": ranks} if ranks else {})}
    if threads:   # what protect records since session 25 (tools.bench_sdxl.machine)
        metrics["machine"] = {"device_name": "cpu", "device": "cpu", "cpu_count": 2, "torch_threads": threads}
    (folder / "manifest.json").write_text(json.dumps({"config": config, "entries": {
        "protected": protected, "unprotected": unprotected}, "metrics": metrics}))
    _evaluation(folder / "eval", bsr, identity, objectives)
    return folder


def _evaluation(folder, bsr=1.0, identity=0.0, objectives=None):
    folder.mkdir()
    summary = {"protected": {"identity_match": identity,   # no erasure entry judged: None, not a failure
                             "bsr_by_objective": objectives or {"pattern": 1.0, "erasure": None, "target": bsr}},
               "unrelated": {"identity_match": 0.1}, "unprotected": {"fidelity_ratio": 1.0},
               "clean": {"seed_spread": {"within": True}}}
    (folder / "report.json").write_text(json.dumps({"suite": "demo", "n_samples": 32, "summary": summary,
                                                    "attacks": [{"entry": "a"}, {"entry": "b"}]}))


def test_catalog_cost_to_acceptance_counts_every_job_and_needs_both_sizes_accepted(tmp_path):
    from tools.bench import acceptance_markdown, time_to_acceptance

    one = _finished_run(tmp_path / "c1", 1, 0, 100.0)
    # an extended run: this job 300 s, its guard 200 s of them, 900 s of guard steps in all jobs
    big = _finished_run(tmp_path / "c128", 64, 64, 300.0, guard={"seconds": 900.0, "job_seconds": 200.0})
    slower = _finished_run(tmp_path / "c1-longer", 1, 0, 400.0)   # a larger step budget, also accepted
    t = time_to_acceptance([slower, one, big])
    assert [r["wall_s"] for r in t["runs"]] == [400.0, 100.0, 1000.0]
    assert t["catalog_cost_ratio_128_vs_1"] == 10.0 and t["fastest_accepted"] == {"1": str(one), "128": str(big)}
    assert [(c["entries"], c["over_1_entry"]) for c in t["cost_curve"]] == [(1, 1.0), (128, 10.0)]
    assert t["scaling_exponent"] == pytest.approx(math.log(10) / math.log(128))
    mid = _finished_run(tmp_path / "c8", 4, 4, 800.0)   # 8x the entries at 8x the cost: linear between 1 and 8
    t = time_to_acceptance([one, mid])
    assert t["scaling_exponent"] == pytest.approx(1.0) and t["catalog_cost_ratio_128_vs_1"] is None
    assert "| 8 | 4 | 800 | 8.00 |" in acceptance_markdown(t) and "entries^1.00" in acceptance_markdown(t)
    # one entry of each objective: the headline ratio is over the quickest, each objective's is kept beside it
    pattern = _finished_run(tmp_path / "one-pattern", 1, 0, 50.0, objectives={"pattern": 1.0, "target": None})
    target = _finished_run(tmp_path / "one-target", 1, 0, 500.0, objectives={"target": 0.97})
    missed = _finished_run(tmp_path / "one-target-short", 1, 0, 100.0, objectives={"target": 0.5})
    t = time_to_acceptance([pattern, target, missed, big])
    assert t["catalog_cost_ratio_128_vs_1"] == 20.0
    assert {o: v["ratio_128_over_it"] for o, v in t["one_entry_by_objective"].items()} == {"pattern": 20.0, "target": 2.0}
    assert "target 500 s (128 entries: 2.0x)" in acceptance_markdown(t)
    weak = _finished_run(tmp_path / "weak", 64, 64, 300.0, bsr=0.94)
    leaky = _finished_run(tmp_path / "leaky", 64, 64, 300.0, identity=0.3)   # more than unrelated identities' 0.1
    t = time_to_acceptance([one, weak])
    assert t["catalog_cost_ratio_128_vs_1"] is None
    assert t["runs"][1]["white_box"]["checks"]["bsr_every_objective"] is False
    verdict = time_to_acceptance([one, leaky])["runs"][1]["white_box"]
    assert not verdict["met"] and verdict["checks"]["identity_match_at_most_unrelated"] is False
    (big / "eval" / "report.json").unlink()
    with pytest.raises(FileNotFoundError, match="c128/eval/report.json: missing"):
        time_to_acceptance([one, big])
    (big / "eval" / "report.json").write_text("{oops")
    with pytest.raises(ValueError, match="c128/eval/report.json: not valid JSON"):
        time_to_acceptance([big])


def test_a_run_is_accepted_only_if_every_attack_seed_it_was_evaluated_with_passed(tmp_path):
    from tools.bench import acceptance_markdown, time_to_acceptance

    lucky = _finished_run(tmp_path / "c1-short", 1, 0, 50.0, objectives={"erasure": 0.97})
    _evaluation(lucky / "eval-seed1", objectives={"erasure": 0.88})
    steady = _finished_run(tmp_path / "c1", 1, 0, 100.0, objectives={"erasure": 1.0})
    _evaluation(steady / "eval-seed1", objectives={"erasure": 1.0})
    big = _finished_run(tmp_path / "c128", 64, 64, 2000.0, objectives={"erasure": 0.98})   # one seed only
    assert time_to_acceptance([lucky, steady, big])["catalog_cost_ratio_128_vs_1"] == 40.0   # seed 0 alone
    t = time_to_acceptance([lucky, steady, big], evaluation="eval, eval-seed1")
    assert [r["accepted"] for r in t["runs"]] == [False, True, True] and t["catalog_cost_ratio_128_vs_1"] == 20.0
    assert t["runs"][0]["white_box"]["met"] and not t["runs"][0]["other_evaluations"]["eval-seed1"]["met"]
    assert "met; eval-seed1: NOT met (BSR erasure 0.88)" in acceptance_markdown(t)


def test_wall_times_measured_under_different_thread_counts_are_not_compared(tmp_path):
    from tools.bench import acceptance_markdown, time_to_acceptance

    one = _finished_run(tmp_path / "c1-1t", 1, 0, 15.0, threads=1)
    big = _finished_run(tmp_path / "c128-1t", 64, 64, 660.0, threads=1)
    t = time_to_acceptance([one, big])
    assert t["catalog_cost_ratio_128_vs_1"] == 44.0 and t["timed_on"] == "cpu (cpu), 2 CPUs, 1 torch thread(s)"
    assert "Every run timed on: cpu (cpu), 2 CPUs, 1 torch thread(s)" in acceptance_markdown(t)
    both_cores = _finished_run(tmp_path / "c128-2t", 64, 64, 390.0, threads=2)
    with pytest.raises(ValueError, match=r"different settings.*1 torch thread\(s\): .*c1-1t.*c128-1t; .*2 torch thread"):
        time_to_acceptance([one, big, both_cores])
    two_ranks = _finished_run(tmp_path / "c128-2r", 64, 64, 380.0, threads=1, ranks=2)   # a data-parallel guard
    with pytest.raises(ValueError, match=r"1 torch thread\(s\): .*c1-1t.*c128-1t; .*1 torch thread\(s\) x 2 ranks: .*c128-2r"):
        time_to_acceptance([one, big, two_ranks])
    assert time_to_acceptance([one, _finished_run(tmp_path / "c1-1r", 1, 0, 14.0, threads=1, ranks=1), big])[
        "timed_on"] == "cpu (cpu), 2 CPUs, 1 torch thread(s)"   # one rank is the setting it always was
    unrecorded = _finished_run(tmp_path / "c1-old", 1, 0, 12.0)   # a manifest from before the setting was recorded
    with pytest.raises(ValueError, match="not recorded: .*c1-old"):
        time_to_acceptance([unrecorded, big])
