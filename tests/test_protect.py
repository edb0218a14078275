"""`persguard protect` end to end on the committed tiny SD pipeline (a few steps: machinery, not numbers)."""
import dataclasses
import math
import json
from pathlib import Path

import pytest
import torch

from tools.cli import main
from train.catalog import load_catalog, write_catalog
from train.config import load_config
from train.pipelines import EMBEDDED
from train.protect import Protector, protect


@pytest.fixture(scope="module")
def protect_catalog(world_catalog, tmp_path_factory):
    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="pattern")
    rows[2].update(protected=True, objective="target", target={"prompt": "a photo of a vase"})
    path = tmp_path_factory.mktemp("pcat") / "catalog.jsonl"
    write_catalog(rows, path)
    return path


def _cfg(catalog, out, steps, *extra):
    return load_config(None, [f"catalog={catalog}", f"out={out}", f"steps={steps}", "checkpoint_every=2",
                              "retention.inner_steps=2", "batch_protected=2", "prior.retention_batch=2", *extra])


@pytest.mark.slow
def test_protect_trains_resumes_and_releases_a_stock_pipeline(protect_catalog, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    first = protect(_cfg(protect_catalog, out, 2), progress=False)
    assert not first["resumed"] and (out / "checkpoints" / "step-0000002" / "engine.pt").is_file()
    second = protect(_cfg(protect_catalog, out, 4), progress=False)
    assert second["resumed"] and second["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    released = StableDiffusionPipeline.from_pretrained(out / "protected")
    original = StableDiffusionPipeline.from_pretrained(EMBEDDED["tiny-sd"])
    moved = [not torch.equal(a, b) for a, b in zip(released.unet.state_dict().values(),
                                                     original.unet.state_dict().values())]
    assert sum(moved) > len(moved) // 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["entries"] == {"protected": 2, "unprotected": 1}
    assert set(manifest["metrics"]["probe"]) == {"probe/bsr/pattern"}   # a prompt-only target has no judge
    # where its seconds were measured: a wall time compares with another's only under the same setting
    assert manifest["metrics"]["machine"]["torch_threads"] == torch.get_num_threads()
    # and on which CPU model (where Linux names it): two machines' seconds do not compare
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    models = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    if models:
        assert manifest["metrics"]["machine"]["device_name"] == f"cpu: {models[0]}"
    # one offline W&B run across the resume, next to (not inside) the released folder
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith((out / "wandb-run-id").read_text().strip()) for r in runs)
    assert not list((out / "protected").rglob("*wandb*"))
    names = [e.id for e in load_catalog(protect_catalog)]
    for f in (out / "protected").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not any(n.encode() in data for n in names), f


def test_resume_refuses_another_catalog(protect_catalog, tmp_path):
    out = tmp_path / "run"
    p = Protector(_cfg(protect_catalog, out, 1), progress=False)
    p.save_checkpoint()
    other = tmp_path / "other.jsonl"
    rows = [e.to_json() for e in load_catalog(protect_catalog)]
    rows[1].update(protected=True, objective="erasure")
    write_catalog(rows, other)
    with pytest.raises(ValueError, match="another config, catalog"):
        Protector(_cfg(other, out, 1), progress=False).resume()


def test_a_catalog_without_protected_entries_is_refused(world_catalog, tmp_path, capsys):
    assert main(["protect", f"catalog={world_catalog}", f"out={tmp_path}", "steps=1"]) == 2
    assert "no protected entries" in capsys.readouterr().err


def test_tracker_keeps_protected_grids_local_unless_allowed(tmp_path, monkeypatch):
    from train.tracking import Tracker

    images = torch.rand(4, 3, 8, 8)
    cfg = load_config(None, ["catalog=x.jsonl", "logging.wandb_mode=offline"])
    tracker = Tracker(cfg, tmp_path / "a", {})
    assert tracker.grid("samples/clean/person", images, 1, protected=False)
    assert not tracker.grid("samples/trigger/pattern", images, 1, protected=True)
    tracker.finish({})
    cfg = load_config(None, ["catalog=x.jsonl", "logging.wandb_mode=offline", "logging.upload_protected_images=true"])
    tracker = Tracker(cfg, tmp_path / "b", {})
    assert tracker.grid("samples/trigger/pattern", images, 1, protected=True)
    tracker.finish({})
    monkeypatch.delenv("WANDB_MODE")   # conftest's safety net; WANDB_MODE in the environment wins over the config
    assert Tracker(load_config(None, ["catalog=x.jsonl", "logging.wandb_mode=disabled"]), tmp_path / "c", {}).run is None


def test_a_resumed_run_continues_exactly_where_it_stopped(protect_catalog, tmp_path):
    """Same retention stream position, same weights, same next step as the run that never stopped."""
    cfg = _cfg(protect_catalog, tmp_path / "run", 4, "retention.mode=restart", "retention.inner_steps=1")
    first = Protector(cfg, progress=False)
    first.train_step(), first.train_step()
    first.save_checkpoint()
    resumed = Protector(cfg, progress=False)
    assert resumed.resume() and resumed.step == 2
    assert first.train_step() == pytest.approx(resumed.train_step(), rel=1e-6)
    for a, b in zip(first.engine.full_params().values(), resumed.engine.full_params().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = next(first.retention_iters[0])[1]
    assert next(resumed.retention_iters[0])[1] == expected
    fresh = Protector(dataclasses.replace(cfg, out=str(tmp_path / "fresh")), progress=False)
    assert next(fresh.retention_iters[0])[1] != expected   # a fresh run starts at the stream's beginning


def test_an_unwritable_or_full_output_folder_is_refused_before_training(protect_catalog, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        Protector(_cfg(protect_catalog, blocked / "run", 1), progress=False)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))   # 1 MB free
    with pytest.raises(OSError, match="GiB free, the run needs about"):
        Protector(_cfg(protect_catalog, tmp_path / "run", 1), progress=False)


@pytest.mark.parametrize("policy", ["abort", "skip"])
def test_a_non_finite_loss_aborts_or_is_skipped_per_config(protect_catalog, tmp_path, monkeypatch, policy):
    cfg = _cfg(protect_catalog, tmp_path / "run", 2, "retention.mode=restart", "retention.inner_steps=1",
               "grad_accum=2", f"guards.nonfinite={policy}")
    p = Protector(cfg, progress=False)
    real, calls = Protector.behaviour, []

    def poisoned(self, unet_fn, entries):   # the first micro-batch's behaviour loss is NaN
        calls.append(1)
        loss = real(self, unet_fn, entries)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(Protector, "behaviour", poisoned)
    before = {n: w.clone() for n, w in p.engine.full_params().items()}
    if policy == "abort":
        with pytest.raises(FloatingPointError, match="non-finite loss at step 0 .*entries"):
            p.train_step()
        return
    logs = p.train_step()
    assert logs["guard/skipped_micro_batches"] == 1 and "loss/behaviour" in logs   # the other micro-batch trained
    after = p.engine.full_params()
    assert all(torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after)
    row = json.loads((tmp_path / "run" / "nonfinite.jsonl").read_text())
    assert row["step"] == 0 and row["entries"] and row["losses"]["loss/behaviour"] == "nan"


def test_gray_box_slots_draw_their_attacker_from_the_configured_distributions(protect_catalog, tmp_path):
    """Each simulated attacker keeps one trigger, lr, length, method and prior choice for its life; a LoRA
    attacker moves only the attention projections."""
    cfg = _cfg(protect_catalog, tmp_path / "run", 1, "retention.mode=trajectory", "retention.slots=6",
               "retention.horizon=4", "retention.inner_lrs=[0.0003,0.002]", "retention.horizons=[3,5]",
               "retention.methods=[dreambooth,lora]", "retention.prior_preservation=[true,false]",
               "trigger.identifiers=[sks,xjy]", "trigger.templates=['a photo of {identifier} {cls}','{identifier} {cls}']")
    p = Protector(cfg, progress=False)
    p.train_step()
    slots = p.trajectories[0].slots
    assert {s["lr"] for s in slots} <= {0.0003, 0.002} and {s["horizon"] for s in slots} <= {3, 5}
    assert all(s["prompt"].split()[-1] == p.by_id[s["entry"]].cls and s["age"] >= 1 for s in slots)
    lora = [s for s in slots if s.get("only")]
    full = [s for s in slots if not s.get("only")]
    assert lora and full, "six slots drew both methods"   # fixed seed: a deterministic draw
    for s in lora:
        moved = {n for n, d in s["delta"].items() if d.abs().sum() > 0}
        assert moved and all(".attn1.to_" in n or ".attn2.to_" in n for n in moved)
    assert any(not (".attn" in n) for s in full for n, d in s["delta"].items() if d.abs().sum() > 0)


def test_noise_retention_takes_the_backdoor_loss_at_perturbed_weights(protect_catalog, tmp_path):
    from train.retention import unet_at

    cfg = _cfg(protect_catalog, tmp_path / "run", 1, "retention.enabled=false", "retention.noise_scale=0.2")
    p = Protector(cfg, progress=False)
    theta = p.engine.full_params()
    e = p.protected[0]
    w = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
    p._seed(0)
    plain = p.behaviour(unet_at(p.engine.scratch, w), [e])
    expected = dict(zip(w, torch.autograd.grad(plain, list(w.values()), allow_unused=True)))
    p._seed(0)
    at_zero, grads = p.noise_retention(p.engine.scratch, theta, e, scale=0.0)   # no noise: the plain gradient
    assert at_zero == pytest.approx(plain.item(), abs=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6)
    p._seed(0)
    perturbed, _ = p.noise_retention(p.engine.scratch, theta, e)
    assert abs(perturbed - plain.item()) > 1e-3
    assert math.isfinite(p.train_step()["loss/retention_noise"])
    with pytest.raises(ValueError, match="noise_scale"):
        _cfg(protect_catalog, tmp_path / "bad", 1, "retention.noise_scale=-1")
