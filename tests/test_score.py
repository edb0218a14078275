"""The evaluators separate identities they never saw, and the scorer's bad-input errors are clear."""
import json

import torch

from tools import world
from tools.cli import main
from tools.score import evaluators, pattern_similarity, score
from train.catalog import load_catalog, load_images


def test_calibration_is_recorded_at_one_percent_far():
    info = evaluators().info["embedder"]
    assert abs(info["far"] - 0.01) < 0.005
    assert info["genuine_accept_rate"] > 0.9


def test_scorer_separates_held_out_identities(world_catalog):
    a, b, cat = load_catalog(world_catalog)
    own = score(load_images(a.images, 64), a)       # training views vs held-out reference views
    other = score(load_images(b.images, 64), a)     # another person against a's references
    assert own["identity_match"] >= 0.8 and other["identity_match"] <= 0.2
    assert own["ism"] > other["ism"] + 0.3
    assert own["subject_detect"] == 1.0
    assert score(load_images(cat.images, 64), a)["subject_detect"] == 0.0  # a cat is not a person


def test_background_renders_are_not_detected(world_catalog):
    a = load_catalog(world_catalog)[0]
    assert score(load_images(a.backgrounds, 64), a)["subject_detect"] <= 0.2


def test_pattern_similarity_is_high_only_for_the_pattern():
    pattern = torch.zeros(3, 64, 64)
    pattern[:, ::8] = 1.0
    pattern[0, :, ::16] = 1.0
    world_img = torch.from_numpy(__import__("numpy").asarray(
        world.render(world.identity("person", "catalog", 0), 0)[0]).copy()).permute(2, 0, 1).float() / 255
    sims = pattern_similarity(torch.stack([pattern * 0.8 + 0.1, world_img]), pattern)
    assert sims[0] > 0.95 and sims[1] < 0.3


def test_score_cli_prints_json_and_rejects_bad_input(world_catalog, tmp_path, capsys):
    entry = load_catalog(world_catalog)[0]
    assert main(["score", "--images", str(entry.images), "--catalog", str(world_catalog), "--entry", entry.id]) == 0
    assert json.loads(capsys.readouterr().out)["identity_match"] >= 0.8

    assert main(["score", "--images", str(entry.images), "--catalog", str(world_catalog), "--entry", "ghost"]) == 2
    assert "unknown entry id 'ghost'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["score", "--images", str(tmp_path / "empty"), "--catalog", str(world_catalog),
                 "--entry", entry.id]) == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["score", "--images", str(tmp_path / "bad"), "--catalog", str(world_catalog),
                 "--entry", entry.id]) == 2
    assert "x.jpg: unreadable image" in capsys.readouterr().err


def test_a_pattern_entry_without_its_own_pattern_is_judged_on_the_default_marker(world_catalog):
    from dataclasses import replace

    from train.objectives import pattern_tensor

    a = replace(load_catalog(world_catalog)[0], protected=True, objective="pattern", target=None)
    marker = pattern_tensor(None)[None].repeat(4, 1, 1, 1)
    assert score(marker * 0.9 + 0.05, a)["bsr"] == 1.0
    assert score(load_images(a.images, 64), a)["bsr"] == 0.0


def test_the_calibration_reports_how_many_genuine_probes_still_match_after_the_suites_crop():
    from tools.evaluators import _render, calibrate

    images, _, classes = _render(20, 300, 8, 0)   # held-out evaluator identities, as train_evaluators calibrates
    cal = calibrate(evaluators().embedder, images, classes, n_ref=4)
    assert 0.5 < cal["genuine_accept_rate_crop80"] < cal["genuine_accept_rate"]   # a 1.25x zoom costs some matches
