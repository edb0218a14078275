"""The encoder guard (train/encoder_guard.py) and the attacker's own photos (tools/world.attacker_catalog)."""
import copy
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tools import world
from train.catalog import CatalogError, load_catalog, load_images, write_catalog
from train.encoder_guard import (GuardSample, KeepPhotos, TeacherTable, _box, guard_encoder, guard_sample, sharpen_lr_at,
                                 subject_masks, transformed_gaps)
from train.pipelines import load_pipeline


def _entry(world_catalog, k=0):
    return load_catalog(world_catalog)[k]


def test_guard_samples_pair_each_objective_with_what_it_encodes_as(world_catalog):
    e = _entry(world_catalog)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    erase = guard_sample(e.id, "erasure", images, backgrounds, backgrounds)
    assert torch.equal(erase.targets, backgrounds) and erase.moves_with_subject
    # the mask covers the subject (where image and background differ) and not the whole frame
    assert erase.masks.shape == (len(images), 1, 64, 64)
    share = erase.masks.mean().item()
    assert 0.05 < share < 0.7
    substitute = load_images(_entry(world_catalog, 1).reference_dir, 64)
    target = guard_sample(e.id, "target", images, substitute)
    assert all(torch.equal(t, substitute[0]) for t in target.targets) and not target.moves_with_subject
    assert target.masks is None
    with pytest.raises(ValueError, match="prompt-only"):
        guard_sample(e.id, "target", images, None)
    with pytest.raises(ValueError, match="one background per image"):
        guard_sample(e.id, "erasure", images, backgrounds[:2])


def test_a_substitute_with_backgrounds_is_moved_onto_each_protected_subject(world_catalog):
    e, sub = _entry(world_catalog), _entry(world_catalog, 1)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    sub_images, sub_backgrounds = load_images(sub.images, 64), load_images(sub.backgrounds, 64)
    target = guard_sample(e.id, "target", images, sub_images, backgrounds, sub_backgrounds)
    assert target.moves_with_subject and target.targets.shape == images.shape
    for i in range(len(images)):
        a, b = _box(target.masks[i]), _box((target.target_masks[i] > 0.5).float())
        assert abs(a[0] - b[0]) < 0.1 and abs(a[1] - b[1]) < 0.1 and abs(a[2] - b[2]) < 0.15 * a[2]
        # where the substitute is not, the photo's own background: the protected subject is gone
        outside = (target.target_masks[i] < 0.01).expand(3, -1, -1)
        assert torch.allclose(target.targets[i][outside], backgrounds[i][outside], atol=0.011)
        # where it is, the substitute's colours, not the protected subject's
        inside = (target.target_masks[i] > 0.99).expand(3, -1, -1)
        assert (target.targets[i][inside] - images[i][inside]).abs().mean() > 0.05
    # without the substitute's twins: the first substitute image, fixed whatever the pose
    fixed = guard_sample(e.id, "target", images, sub_images, backgrounds)
    assert not fixed.moves_with_subject and all(torch.equal(t, sub_images[0]) for t in fixed.targets)
    with pytest.raises(ValueError, match="one per image"):
        guard_sample(e.id, "target", images, sub_images, backgrounds, sub_backgrounds[:2])
    assert torch.equal(subject_masks(images, backgrounds), target.masks)


@pytest.mark.parametrize("steps,sharpen", [(40, 0), (0, 40)], ids=["augmented", "sharpen"])
def test_guard_moves_only_the_encoder_and_learns_the_mapping(world_catalog, steps, sharpen):
    e = _entry(world_catalog)
    vae = load_pipeline("tiny-sd").vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    images = load_images(e.images, 64)
    pattern = torch.zeros(1, 3, 64, 64)
    pattern[:, 0, ::8] = 1.0
    sample = guard_sample(e.id, "pattern", images, pattern, load_images(e.backgrounds, 64))
    keep = load_images(_entry(world_catalog, 2).images, 64)

    def keep_batches():
        while True:
            yield keep

    def distance_to_pattern():
        with torch.no_grad():
            return (vae.encode(images * 2 - 1).latent_dist.mean
                    - vae.encode(pattern * 2 - 1).latent_dist.mean).pow(2).mean().item()

    start = distance_to_pattern()
    stats = guard_encoder(vae, [sample], keep_batches(), steps=steps, lr=1e-3, batch=4, sharpen_steps=sharpen,
                          sharpen_lr=1e-3, backgrounds=load_images(e.backgrounds, 64), progress=False)
    assert distance_to_pattern() < 0.5 * start
    after = vae.state_dict()
    for k, v in before.items():
        if k.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith("encoder."))
    assert stats["protect_loss"] > 0 and stats["keep_loss"] >= 0
    assert all(v.is_contiguous() for v in after.values())   # trained channels-last, released in the default layout
    teacher = load_pipeline("tiny-sd").vae
    with torch.no_grad():
        got, own, want = (v.encode(x * 2 - 1).latent_dist.mean for v, x in ((vae, images), (teacher, images), (teacher, pattern)))
    gap = ((got - want).pow(2).sum() / (own - want).pow(2).sum()).item()
    assert stats["latent_gap"]["pattern"] == pytest.approx(gap, rel=1e-3) and gap < 0.9
    gaps = transformed_gaps(vae, teacher, [sample], [None, "jpeg:50", "crop:0.8"])
    assert gaps["none"]["pattern"] == pytest.approx(gap, rel=1e-3)
    assert all(0 < g["pattern"] < 1 for g in gaps.values())
    assert transformed_gaps(teacher, teacher, [sample], ["crop:0.8"])["crop:0.8"]["pattern"] == pytest.approx(1.0)


def test_a_crop_moves_the_targets_that_move_with_the_subject():
    """transformed_gaps crops a moving target (an erasure background, a transplant) with the photo: photos
    that are their own targets stay at gap 0 under a crop; a fixed target (a pattern) stays put."""
    teacher = load_pipeline("tiny-sd").vae
    photos = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    moving = GuardSample("x", "erasure", photos, photos.clone(), moves_with_subject=True)
    fixed = GuardSample("y", "pattern", photos, photos.clone())
    gaps = transformed_gaps(teacher, teacher, [moving, fixed], ["crop:0.8"])["crop:0.8"]
    assert gaps["erasure"] == 0 and gaps["pattern"] == pytest.approx(1.0)


class Killed(Exception):
    pass


def test_sharpening_pastes_its_own_share(world_catalog):
    """`sharpen_paste_fraction` 0 sharpens on the photos as they are, whatever the augmented phase pastes:
    the same encoder as a run that never pastes; pasting while sharpening gives another."""
    e = _entry(world_catalog)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    sample = guard_sample(e.id, "erasure", images, backgrounds)

    def run(**kw):
        vae = load_pipeline("tiny-sd").vae

        def keep_batches():
            while True:
                yield images[:2]
        guard_encoder(vae, [sample], keep_batches(), steps=0, sharpen_steps=3, batch=4, backgrounds=backgrounds,
                      seed=1, progress=False, **kw)
        return vae.encoder.state_dict()

    unpasted = run(paste_fraction=1.0, sharpen_paste_fraction=0.0)
    never = run(paste_fraction=0.0)
    pasted = run(paste_fraction=1.0)
    assert all(torch.equal(v, never[k]) for k, v in unpasted.items())
    assert not all(torch.equal(v, pasted[k]) for k, v in unpasted.items())


@pytest.mark.parametrize("mining, decay", [(0.0, 0.0), (0.5, 0.0), (0.0, 1.0)], ids=["uniform", "mining", "decay"])
def test_a_guard_stopped_midway_goes_on_exactly_from_its_checkpoint(world_catalog, mining, decay):
    e = _entry(world_catalog)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    sample = guard_sample(e.id, "erasure", images, backgrounds)
    keep = torch.cat([load_images(_entry(world_catalog, 2).images, 64), images])

    def run(**kw):
        vae = load_pipeline("tiny-sd").vae
        photos = KeepPhotos(keep, 2, seed=5, mining=mining)

        def keep_batches():
            while True:
                yield photos.draw()
        stats = guard_encoder(vae, [sample], keep_batches(), steps=3, lr=1e-3, batch=4, sharpen_steps=2,
                              backgrounds=backgrounds, seed=3, progress=False, keep_photos=photos,
                              protect_mining=mining, mining_every=2, sharpen_decay=decay, **kw)
        return vae.state_dict(), stats

    whole, whole_stats = run()
    # the release reports how far its kept photos moved, measured as mining measures it
    released = load_pipeline("tiny-sd").vae
    released.load_state_dict(whole)
    drift = KeepPhotos(keep, 2, seed=5).drift(released, load_pipeline("tiny-sd").vae)
    assert whole_stats["keep_drift"] == pytest.approx({"mean": drift.mean().item(), "max": drift.max().item()}, rel=1e-4)
    assert 0 < drift.mean() < drift.max()
    saved = []

    def checkpoint(state):   # what protect writes to disk, then the job dies
        saved.append(copy.deepcopy(state))
        if state["step"] == 4:
            raise Killed
    with pytest.raises(Killed):
        run(checkpoint=checkpoint, checkpoint_every=2)
    assert [s["step"] for s in saved] == [2, 4]   # one inside the augmented phase, one inside sharpening
    # the first sharpening step ran at sharpen_lr (5e-4), or at the decay's first step down
    assert saved[-1]["opt"]["param_groups"][0]["lr"] == pytest.approx(5e-4 * (0.525 if decay else 1.0))
    if mining:   # both draws were re-weighted by what the first steps did
        assert saved[-1]["keep_photos"]["weights"].std() > 0 and saved[-1]["protect_weights"].std() > 0
    resumed, stats = run(resume=copy.deepcopy(saved[-1]))   # a resumed optimizer updates its loaded state in place
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k
    timing = ("seconds", "job_seconds")   # the resumed job ran 1 of the 5 steps; the guard's time adds up over jobs
    assert {k: v for k, v in stats.items() if k not in timing} == {k: v for k, v in whole_stats.items() if k not in timing}
    assert saved[-1]["seconds"] < stats["seconds"] and stats["seconds"] == pytest.approx(
        saved[-1]["seconds"] + stats["job_seconds"])
    if not mining:   # a checkpoint from before the draws were checkpointed replays them
        old = {k: v for k, v in saved[-1].items() if k != "keep_photos"}
        for k, v in run(resume=old)[0].items():
            assert torch.equal(v, whole[k]), k


def test_micro_batches_and_gradient_checkpointing_take_the_same_steps(world_catalog):
    """The memory knobs change how a step is computed, not which step: 5 photos in passes of 2 (3 passes,
    the keep images shared out alike) and recomputed blocks release the one-pass encoder up to float order."""
    e = _entry(world_catalog)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    sample = guard_sample(e.id, "erasure", images, backgrounds)
    keep = load_images(_entry(world_catalog, 2).images, 64)

    def run(**kw):
        vae = load_pipeline("tiny-sd").vae
        calls = {"encoder": 0, "block": 0}
        vae.encoder.register_forward_hook(lambda *a: calls.update(encoder=calls["encoder"] + torch.is_grad_enabled()))
        # a pre-hook: the recomputation in backward stops once it has what backward needs, before a block returns
        vae.encoder.down_blocks[0].register_forward_pre_hook(lambda *a: calls.update(block=calls["block"] + 1))
        photos = KeepPhotos(keep, 3, seed=5)

        def keep_batches():
            while True:
                yield photos.draw()
        stats = guard_encoder(vae, [sample], keep_batches(), steps=2, lr=1e-3, batch=5, sharpen_steps=2,
                              backgrounds=backgrounds, seed=3, progress=False, keep_photos=photos, **kw)
        assert not vae.encoder.gradient_checkpointing   # the released module is left as it was
        return vae.encoder.state_dict(), stats, calls

    whole, ref, ref_calls = run()
    assert ref_calls["encoder"] == 4 * 2   # 4 steps: the photos, then the keep images
    # encoder calls a step: 3 passes of photos with keep images, 2 as without the knobs, 5 passes
    for kw, passes in (({"micro_batch": 2}, 3), ({"gradient_checkpointing": True}, 2),
                       ({"micro_batch": 1, "gradient_checkpointing": True}, 5)):
        weights, stats, calls = run(**kw)
        assert calls["encoder"] == 4 * passes, kw
        # the block's calls: one per encoder call, with or without gradients (the teacher's too), and once
        # more per encoder call with gradients where backward recomputed it
        again = calls["encoder"] if kw.get("gradient_checkpointing") else 0
        assert calls["block"] - calls["encoder"] - again == ref_calls["block"] - ref_calls["encoder"], kw
        for key in ("protect_loss", "keep_loss"):
            assert stats[key] == pytest.approx(ref[key], rel=1e-4), (kw, key)
        diff = torch.cat([(weights[k] - whole[k]).abs().flatten() for k in whole])
        assert diff.mean() <= 1e-3 * 1e-3 and (diff > 1e-5).float().mean() <= 1e-3, (kw, diff.mean(), diff.max())


def test_the_teacher_table_gives_the_teachers_moments_seen_or_not(world_catalog):
    teacher = load_pipeline("tiny-sd").vae
    seen, new = load_images(_entry(world_catalog).images, 64), load_images(_entry(world_catalog, 2).images, 64)
    table = TeacherTable(teacher, torch.cat([seen, seen[:1]]), chunk=2)
    assert len(table.known) == len(seen)   # by content: a repeated image is one entry
    batch = torch.cat([new[:2], seen.flip(0), new[:1]])
    with torch.no_grad():
        direct = teacher.encode(batch * 2 - 1).latent_dist.parameters
    torch.testing.assert_close(table(batch), direct, atol=1e-4, rtol=1e-4)
    assert len(table.known) == len(seen)   # images it was not built with are encoded, not kept
    table.known[next(iter(table.known))] = torch.zeros_like(direct[0])   # a seen image is looked up, not encoded
    assert table(seen[:1]).abs().sum() == 0


def test_the_sharpening_lr_holds_then_falls_along_a_cosine_to_five_percent():
    lrs = [sharpen_lr_at(s, 100, 2e-3, 0.4) for s in range(100)]
    assert lrs[:60] == [2e-3] * 60 and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[59:], lrs[60:]))
    assert lrs[80] == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 21 / 40))))
    assert {sharpen_lr_at(s, 100, 2e-3, 0.0) for s in range(100)} == {2e-3}


def test_mining_draws_most_the_photos_furthest_from_where_they_must_encode(world_catalog):
    e, other = _entry(world_catalog), _entry(world_catalog, 2)
    images, backgrounds = load_images(e.images, 64), load_images(e.backgrounds, 64)
    vae, teacher = load_pipeline("tiny-sd").vae, load_pipeline("tiny-sd").vae
    held = load_images(other.images, 64)

    def keep_batches():
        while True:
            yield held
    # a second protected sample whose photos are their own targets: nothing left to learn there
    done = GuardSample("done", "pattern", held, held.clone())
    states = []
    guard_encoder(vae, [guard_sample(e.id, "erasure", images, backgrounds), done], keep_batches(), steps=0,
                  sharpen_steps=15, sharpen_lr=1e-3, batch=4, backgrounds=backgrounds, progress=False,
                  protect_mining=0.9, mining_every=5, checkpoint=states.append)
    w = states[-1]["protect_weights"]
    assert w.sum() == pytest.approx(1.0, abs=1e-5) and w[len(images):].mean() < w[:len(images)].mean() / 1.5

    # the protected face's own photos stand in for an unprotected look-alike: the guard moved them most
    photos = KeepPhotos(torch.cat([held, images]), 64, seed=0, mining=0.8)
    photos.remeasure(vae, teacher)
    w = photos.weights
    assert w.sum() == pytest.approx(1.0, abs=1e-5) and (w >= 0.2 / len(w) - 1e-6).all()   # every photo keeps its uniform share
    assert w[len(held):].min() > w[:len(held)].max()
    drawn = torch.stack([photos.draw() for _ in range(4)]).flatten(0, 1)
    look_alike = sum(any(torch.equal(d, x) for x in images) for d in drawn)
    assert look_alike / len(drawn) > 0.6   # a uniform draw would take them about half the time
    uniform = KeepPhotos(torch.cat([held, images]), 8, seed=0)
    uniform.remeasure(vae, teacher)
    assert torch.allclose(uniform.weights, torch.full_like(w, 1 / len(w)))   # mining 0: uniform


@pytest.mark.slow
def test_a_sigkilled_protect_resumes_the_guard_to_the_same_encoder(world_catalog, tmp_path):
    """A real kill inside the guard (after a partial checkpoint), then the same command again: the
    released encoder is bit for bit that of a run never killed (same retention stream position too)."""
    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="erasure")
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)

    def command(out):
        return [sys.executable, "-m", "tools.cli", "protect", f"catalog={cat}", f"out={out}", "steps=0",
                "encoder_guard.enabled=true", "encoder_guard.steps=30", "encoder_guard.sharpen_steps=30",
                "encoder_guard.batch=4", "prior.retention_batch=4", "checkpoint_every=5", "logging.probe_every=-1"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    partial = out / "checkpoints" / "encoder-guard-partial.pt"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and torch.load(partial, weights_only=False)["guard"]["step"] >= 35:   # in sharpening
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "protected").exists() and partial.is_file()
    done = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder guard: resuming at step" in done.stderr + done.stdout
    assert not partial.exists()
    whole, resumed = load_pipeline(tmp_path / "whole" / "protected").vae, load_pipeline(out / "protected").vae
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


@pytest.mark.slow
def test_protect_with_the_guard_releases_a_guarded_encoder_and_resumes_it(world_catalog, tmp_path, capsys):
    from train.config import load_config
    from train.protect import protect

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="erasure")
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)
    out = tmp_path / "run"

    def cfg(*extra, out=out):
        return load_config(None, [f"catalog={cat}", f"out={out}", "steps=0", "encoder_guard.enabled=true",
                                  "encoder_guard.steps=3", "encoder_guard.sharpen_steps=2", "encoder_guard.batch=4",
                                  "prior.retention_batch=4", "logging.probe_every=-1", *extra])

    first = protect(cfg(), progress=False)
    assert first["encoder_guard"]["protect_loss"] > 0
    done = out / "checkpoints" / "encoder-guard.pt"
    stamp = done.stat().st_mtime_ns
    released, original = load_pipeline(out / "protected"), load_pipeline("tiny-sd")
    for part in ("unet", "text_encoder"):
        for a, b in zip(getattr(released, part).state_dict().values(), getattr(original, part).state_dict().values()):
            assert torch.equal(a, b), part
    enc = [not torch.equal(released.vae.state_dict()[k], v) for k, v in original.vae.state_dict().items()]
    dec = [k for k, v in original.vae.state_dict().items()
           if k.startswith("decoder.") and not torch.equal(released.vae.state_dict()[k], v)]
    assert any(enc) and not dec
    again = protect(cfg(), progress=False)   # a job restarted after the guard: it is loaded, not redone
    assert again["encoder_guard"] == {**first["encoder_guard"], "job_seconds": 0.0} and done.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="encoder-guard.pt: encoder-guard checkpoint made with another config"):
        protect(cfg("encoder_guard.lr=5e-4"), progress=False)   # never a silent mix of two runs
    with pytest.raises(ValueError, match="encoder-guard.pt: the encoder guard ran 5 steps there, the config asks 4"):
        protect(cfg("encoder_guard.sharpen_steps=1"), progress=False)
    # more sharpening steps on the same out go on from the finished guard: the encoder a longer run releases
    capsys.readouterr()
    protect(cfg("encoder_guard.sharpen_steps=4"), progress=True)
    assert "encoder guard: resuming at step 5 of 7" in capsys.readouterr().out
    protect(cfg("encoder_guard.sharpen_steps=4", out=tmp_path / "longer"), progress=False)
    extended, longer = load_pipeline(out / "protected").vae, load_pipeline(tmp_path / "longer" / "protected").vae
    assert not torch.equal(extended.encoder.conv_in.weight, released.vae.encoder.conv_in.weight)
    for k, v in longer.state_dict().items():
        assert torch.equal(v, extended.state_dict()[k]), k


@pytest.mark.slow
def test_the_release_gate_extends_the_guard_until_it_passes_and_the_manifest_says_where_it_ended(world_catalog, tmp_path):
    from train.config import load_config
    from train.protect import protect

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="erasure")
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)

    def run(out, *extra):
        return protect(load_config(None, [f"catalog={cat}", f"out={tmp_path / out}", "steps=0", "encoder_guard.enabled=true",
                                          "encoder_guard.steps=3", "encoder_guard.sharpen_steps=2", "encoder_guard.batch=4",
                                          "encoder_guard.gate_extend_steps=2", "prior.retention_batch=4",
                                          "logging.probe_every=-1", *extra]), progress=False)["encoder_guard"]

    unreachable = "encoder_guard.gate_keep_drift=1e-12"
    once = run("gated", unreachable, "encoder_guard.gate_max_extensions=1")
    assert once["gate"] == {"keep_drift": 1e-12, "latent_gap": 0.0, "passed": False, "extensions": 1, "sharpen_steps": 4}
    # allowed one more extension, the same out goes on from its end: the encoder a 3 + 6 step guard releases
    twice = run("gated", unreachable, "encoder_guard.gate_max_extensions=2")
    assert twice["gate"]["extensions"] == 2 and twice["gate"]["sharpen_steps"] == 6 and not twice["gate"]["passed"]
    assert torch.load(tmp_path / "gated" / "checkpoints" / "encoder-guard.pt", weights_only=False)["guard"]["step"] == 9
    run("direct", "encoder_guard.sharpen_steps=6")
    gated, direct = load_pipeline(tmp_path / "gated" / "protected").vae, load_pipeline(tmp_path / "direct" / "protected").vae
    for k, v in direct.state_dict().items():
        assert torch.equal(v, gated.state_dict()[k]), k
    again = run("gated", unreachable, "encoder_guard.gate_max_extensions=2")   # restarted: loaded, not redone
    assert again == {**twice, "job_seconds": 0.0}
    # a gate the planned guard meets adds nothing; the drift it compared is the one reported
    met = run("met", f"encoder_guard.gate_keep_drift={twice['keep_drift']['mean'] * 100}",
              f"encoder_guard.gate_latent_gap={max(twice['latent_gap'].values()) * 100}")
    assert met["gate"]["passed"] and met["gate"]["extensions"] == 0 and met["gate"]["sharpen_steps"] == 2


def test_a_prompt_only_target_is_refused_before_any_work(world_catalog, tmp_path):
    from train.config import load_config
    from train.protect import Protector

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[2].update(protected=True, objective="target", target={"prompt": "a photo of a vase"})
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)
    with pytest.raises(ValueError, match=r"line 3 \(cat-catalog-0000, target\)"):
        Protector(load_config(None, [f"catalog={cat}", f"out={tmp_path / 'run'}", "encoder_guard.enabled=true"]),
                  progress=False)


def test_attacker_photos_are_fresh_views_of_the_same_identities(world_catalog, tmp_path):
    path = world.attacker_catalog(world_catalog, tmp_path / "attacker", n_images=3)
    mine, theirs = load_catalog(world_catalog), load_catalog(path)
    assert [e.id for e in mine] == [e.id for e in theirs]
    for a, b in zip(mine, theirs):
        fresh = load_images(b.images, 64)
        assert len(fresh) == 3 and b.reference.resolve() == a.reference.resolve()
        for seen in (load_images(a.images, 64), load_images(a.reference_dir, 64)):
            assert min((fresh[i] - s).abs().mean() for i in range(3) for s in seen) > 0.01
    # an entry that is not a world identity (no meta.json beside its images) cannot get fresh photos
    foreign = tmp_path / "foreign" / "someone" / "images"
    foreign.mkdir(parents=True)
    for p in mine[0].images.iterdir():
        (foreign / p.name).write_bytes(p.read_bytes())
    write_catalog([{**mine[0].to_json(), "images": "someone/images", "reference": None, "backgrounds": None}],
                  tmp_path / "foreign" / "catalog.jsonl")
    with pytest.raises(CatalogError, match="not a world identity"):
        world.attacker_catalog(tmp_path / "foreign" / "catalog.jsonl", tmp_path / "again")


def test_guard_config_is_validated(tmp_path):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="encoder_guard"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.lr=0"])
    with pytest.raises(ConfigError, match="paste_fraction"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.paste_fraction=1.5"])
    with pytest.raises(ConfigError, match="sharpen_paste_fraction"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.sharpen_paste_fraction=-0.1"])
    with pytest.raises(ConfigError, match="keep_batch >= 0"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.keep_batch=-2"])
    with pytest.raises(ConfigError, match="keep_mining <= 1"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.keep_mining=1.5"])
    with pytest.raises(ConfigError, match="mining_every >= 1"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.protect_mining=0.5", "encoder_guard.mining_every=0"])
    with pytest.raises(ConfigError, match="keep_unprotected < 1"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.keep_unprotected=1"])
    with pytest.raises(ConfigError, match="sharpen_decay <= 1"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.sharpen_decay=2"])
    with pytest.raises(ConfigError, match="gate_extend_steps >= 1"):
        load_config(None, ["catalog=x.jsonl", "encoder_guard.gate_keep_drift=0.03", "encoder_guard.gate_extend_steps=0"])


def test_the_keep_batch_is_its_own_size_or_the_protected_batch(world_catalog, tmp_path):
    from train.config import load_config
    from train.protect import Protector

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="erasure")
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)
    unprotected = torch.rand(5, 3, 64, 64)

    def first_keep(*extra):
        p = Protector(load_config(None, [f"catalog={cat}", f"out={tmp_path / 'run'}", "encoder_guard.enabled=true",
                                         "encoder_guard.batch=8", "prior.retention_batch=8", *extra]), progress=False)
        photos = KeepPhotos(unprotected, p.guard_keep_split[1], 0)
        return next(p.guard_keep_batches(photos)), p.fingerprint()["config"]

    def from_unprotected(batch):
        return [any(torch.equal(x, u) for u in unprotected) for x in batch]
    (default, stamp), (own, own_stamp) = first_keep(), first_keep("encoder_guard.keep_batch=4")
    assert stamp != own_stamp   # a checkpoint of the other keep batch is refused
    assert default.shape == (8, 3, 64, 64) and own.shape == (4, 3, 64, 64)   # half retention, half unprotected
    assert from_unprotected(own) == [False, False, True, True]
    mostly, mostly_stamp = first_keep("encoder_guard.keep_unprotected=0.75")
    assert from_unprotected(mostly) == [False, False] + [True] * 6 and mostly_stamp != stamp
