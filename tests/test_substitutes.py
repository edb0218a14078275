import json

import pytest

from tools import world
from tools.cli import main
from tools.demo import SUBSTITUTE_START, mark_protected
from tools.substitutes import load_ranking, rank


def _record(entry, cls, multiple, ism, match):
    return {"entry": entry, "class": cls, "multiple": multiple, "ism": ism, "identity_match": match}


def test_rank_orders_each_class_by_its_worst_rate_then_margin_along_the_attack():
    report = {"threshold": 0.5, "attacks": [
        # steady: matched at every length, margin 0.2
        _record("cat-catalog-1000", "cat", 0.5, 0.7, 1.0), _record("cat-catalog-1000", "cat", 1, 0.7, 1.0),
        # higher on average but dips under the threshold at 1x
        _record("cat-catalog-1001", "cat", 0.5, 0.9, 1.0), _record("cat-catalog-1001", "cat", 1, 0.45, 0.2),
        # as steady a rate as the first, nearer the threshold
        _record("cat-catalog-1002", "cat", 0.5, 0.6, 1.0), _record("cat-catalog-1002", "cat", 1, 0.6, 1.0),
        _record("vase-catalog-1003", "vase", 0.5, 0.6, 0.8), _record("vase-catalog-1003", "vase", 1, 0.55, 0.6)]}
    ranking = rank(report)
    assert [c["id"] for c in ranking["cat"]] == ["cat-catalog-1000", "cat-catalog-1002", "cat-catalog-1001"]
    assert ranking["cat"][2]["margin"] == pytest.approx(-0.05)
    assert ranking["cat"][2]["identity_match_min"] == 0.2
    assert ranking["vase"][0]["identity_match"] == {"0.5": 0.8, "1": 0.6}
    assert ranking["cat"][0]["draws"] == 1


def test_rank_over_several_draws_takes_the_mean_rate_at_each_length():
    first = {"threshold": 0.5, "attacks": [
        _record("cat-catalog-1000", "cat", 1, 0.9, 1.0), _record("cat-catalog-1001", "cat", 1, 0.6, 0.9)]}
    # the first draw's winner was lucky: another draw of the same attacks
    second = {"threshold": 0.6, "attacks": [
        _record("cat-catalog-1000", "cat", 1, 0.5, 0.4), _record("cat-catalog-1001", "cat", 1, 0.7, 0.9)]}
    assert [c["id"] for c in rank(first)["cat"]] == ["cat-catalog-1000", "cat-catalog-1001"]
    best, other = rank(first, second)["cat"]
    assert (best["id"], best["identity_match"], best["draws"]) == ("cat-catalog-1001", {"1": 0.9}, 2)
    assert other["identity_match_min"] == pytest.approx(0.7)
    assert other["margin"] == pytest.approx((0.4 - 0.1) / 2)   # each draw's margin over its own threshold


def test_world_protect_takes_the_ranked_substitutes(tmp_path):
    ranking = {"model": "tiny-sd", "suite": "curve-short", "seed": 0, "ranking": {
        "person": [{"id": "person-catalog-1005"}, {"id": "person-catalog-1002"}],
        "cat": [{"id": "cat-catalog-1003"}]}}
    (tmp_path / "substitutes.json").write_text(json.dumps(ranking))
    assert load_ranking(tmp_path / "substitutes.json", 0) == {"person": [1005, 1002], "cat": [1003]}
    out = tmp_path / "w"
    main(["world", "--out", str(out), "--classes", "person=6,cat=3", "--protect", "9", "--images", "2",
          "--reference", "1", "--substitutes", str(tmp_path / "substitutes.json")])
    lines = [json.loads(x) for x in (out / "catalog.jsonl").read_text().splitlines()]
    subs = [(e["class"], e["target"]["images"].split("/")[0]) for e in lines if e["objective"] == "target"]
    # the k-th target entry of a class takes its k-th ranked candidate
    assert subs == [("person", "person-catalog-1005"), ("person", "person-catalog-1002"),
                    ("cat", "cat-catalog-1003")]
    assert (out / "person-catalog-1005" / "images").is_dir()
    # a class may take another class's substitutes, the candidates shared in order with that class's own
    cross = tmp_path / "x"
    main(["world", "--out", str(cross), "--classes", "person=6,cat=3", "--protect", "9", "--images", "2",
          "--reference", "1", "--substitutes", str(tmp_path / "substitutes.json"), "--substitute-class", "cat=person"])
    lines = [json.loads(x) for x in (cross / "catalog.jsonl").read_text().splitlines()]
    subs = [(e["class"], e["target"]["images"].split("/")[0]) for e in lines if e["objective"] == "target"]
    assert sorted(c for c, _ in subs) == ["cat", "person", "person"]
    # the three take the person ranking in turn, cycled where it runs out
    assert sorted(sub for _, sub in subs) == ["person-catalog-1002", "person-catalog-1005", "person-catalog-1005"]
    with pytest.raises(SystemExit, match="--substitute-class: expected CLASS=OTHER"):
        main(["world", "--out", str(cross), "--protect", "3", "--substitute-class", "cat"])


def test_bad_rankings_are_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "substitutes.json"
    bad.write_text('{"ranking": {"cat": [{"name": "x"}]}}')
    with pytest.raises(ValueError, match="substitutes.json"):
        load_ranking(bad, 0)
    bad.write_text('{"seed": 0, "ranking": {"cat": [{"id": "cat-pretrain-0003"}]}}')
    with pytest.raises(ValueError, match="substitutes.json: not a substitute ranking.*<class>-catalog-<index>"):
        load_ranking(bad, 0)
    bad.write_text('{"seed": 0, "ranking": {"cat": [{"id": "cat-catalog-1003"}]}}')
    with pytest.raises(ValueError, match="substitutes.json: screened in world seed 0, not 1"):
        load_ranking(bad, 1)
    entries = world.generate(tmp_path / "w", per_class=3, classes=("vase",), n_images=1, n_reference=1,
                             progress=False)
    with pytest.raises(ValueError, match="no ranked substitute candidates of class 'vase'"):
        mark_protected(entries, 3, tmp_path / "w", substitutes={"cat": [SUBSTITUTE_START]})
    with pytest.raises(ValueError, match="vase-catalog-0001 is itself an entry"):
        mark_protected(entries, 3, tmp_path / "w", substitutes={"vase": [1]})


@pytest.mark.slow
def test_substitutes_screens_candidates_and_world_uses_the_ranking(tmp_path, capsys):
    assert main(["substitutes", "--model", "tiny-sd", "--classes", "cat=2", "--suite", "smoke-curve",
                 "--samples", "2", "--draws", "2", "--out", str(tmp_path / "screen")]) == 0
    result = json.loads((tmp_path / "screen" / "substitutes.json").read_text())
    assert result["draws"] == 2 and (tmp_path / "screen" / "screen-1" / "report.json").is_file()
    second = json.loads((tmp_path / "screen" / "screen-1" / "report.json").read_text())
    assert second["seed"] == 1
    cands = result["ranking"]["cat"]
    assert sorted(c["id"] for c in cands) == [f"cat-catalog-{SUBSTITUTE_START}", f"cat-catalog-{SUBSTITUTE_START + 1}"]
    assert all(set(c["identity_match"]) == {"0.5", "1", "2"} and c["draws"] == 2 for c in cands)
    assert (cands[0]["identity_match_min"], cands[0]["margin"]) >= (cands[1]["identity_match_min"], cands[1]["margin"])
    assert "| cat | " + cands[0]["id"] in capsys.readouterr().out
    main(["world", "--out", str(tmp_path / "w"), "--classes", "cat=3", "--protect", "3", "--images", "2",
          "--reference", "1", "--substitutes", str(tmp_path / "screen" / "substitutes.json")])
    target = [json.loads(x) for x in (tmp_path / "w" / "catalog.jsonl").read_text().splitlines()][2]["target"]
    assert target["images"] == f"{cands[0]['id']}/images"


def test_ceiling_catalogs_hold_the_guards_transplant_and_the_substitutes_own_photos_in_entry_order(tmp_path):
    import torch

    from tools.exp_substitute_ceiling import ceiling_catalogs
    from train import encoder_guard, objectives
    from train.catalog import load_catalog, load_images

    out = tmp_path / "w"
    main(["world", "--out", str(out), "--classes", "person=3", "--protect", "3", "--images", "3", "--reference", "2"])
    (target,) = [e for e in load_catalog(out / "catalog.jsonl") if e.objective == "target"]
    paths = ceiling_catalogs(out / "catalog.jsonl", tmp_path / "ceiling")
    (copy,) = load_catalog(paths["targets"])   # the target entry itself, readable from the new folder
    assert copy.id == target.id and torch.equal(objectives.resolve(copy).images, objectives.resolve(target).images)
    (moved_entry,), (own_entry,) = load_catalog(paths["transplant"]), load_catalog(paths["own"])
    assert (moved_entry.id, own_entry.id) == (f"{target.id}-transplant", f"{target.id}-own")
    reference = (out / target.target["reference"]).resolve()
    assert all(not e.protected and e.reference_dir == reference for e in (moved_entry, own_entry))
    sub = objectives.resolve(target)
    images, backgrounds = load_images(target.images, 64), load_images(target.backgrounds, 64)
    moved = encoder_guard.transplant(encoder_guard.subject_masks(images, backgrounds), backgrounds, sub.images,
                                     encoder_guard.subject_masks(sub.images, sub.backgrounds))[0]
    torch.testing.assert_close(load_images(moved_entry.images, 64), moved, atol=1 / 255, rtol=0)
    assert torch.equal(load_images(own_entry.images, 64), sub.images)


def test_substitutes_for_a_catalog_screen_each_target_entry_on_its_own_photos_and_assign_the_best(tmp_path, capsys):
    import torch

    from tools.substitutes import candidate_rows
    from train.catalog import load_catalog, load_images

    out = tmp_path / "w"
    main(["world", "--out", str(out), "--classes", "person=3", "--protect", "3", "--images", "3", "--reference", "2"])
    entries = load_catalog(out / "catalog.jsonl")
    (target,) = [e for e in entries if e.objective == "target"]
    # candidates of any class moved onto the entry's photos, judged against each candidate's held-out views
    vase, person = candidate_rows(out / "catalog.jsonl", target, ["vase-catalog-1006", "person-catalog-1001"],
                                  tmp_path / "cands")
    assert (vase["id"], vase["class"], vase["protected"]) == (f"{target.id}-as-vase-catalog-1006", "person", False)
    assert vase["reference"] == str((tmp_path / "cands" / "world" / "vase-catalog-1006" / "reference").resolve())
    assert len(load_images(vase["images"], 64)) == 3
    assert not torch.equal(load_images(vase["images"], 64), load_images(person["images"], 64))
    with pytest.raises(ValueError, match="'dog-catalog-1': expected <class>-catalog-<index>"):
        candidate_rows(out / "catalog.jsonl", target, ["dog-catalog-1"], tmp_path / "cands")

    screen = tmp_path / "screen"
    assert main(["substitutes", "--catalog", str(out / "catalog.jsonl"), "--candidates",
                 "vase-catalog-1006,person-catalog-1001", "--suite", "smoke-curve", "--samples", "2",
                 "--out", str(screen)]) == 0
    result = json.loads((screen / "substitutes.json").read_text())
    ranked = result["per_entry"][target.id]
    assert [c["id"] for c in ranked] in (["vase-catalog-1006", "person-catalog-1001"],
                                         ["person-catalog-1001", "vase-catalog-1006"])
    assert (ranked[0]["identity_match_min"], ranked[0]["margin"]) >= (ranked[1]["identity_match_min"], ranked[1]["margin"])
    assigned = load_catalog(screen / "catalog.jsonl")   # read from another folder: every path still resolves
    assert [e.id for e in assigned] == [e.id for e in entries]
    for old, new in zip(entries, assigned):
        assert torch.equal(load_images(old.images, 64), load_images(new.images, 64))
        if old.objective != "target":
            assert (new.objective, new.protected) == (old.objective, old.protected)
    (new_target,) = [e for e in assigned if e.objective == "target"]
    assert new_target.target["images"] == str((screen / "world" / ranked[0]["id"] / "images").resolve())
    assert f"| {target.id} | {ranked[0]['id']} |" in (screen / "substitutes.md").read_text()
    assert result["weak"] == ([target.id] if ranked[0]["identity_match_min"] < 0.95 else [])   # 2 samples, 4 steps
    assert main(["substitutes", "--catalog", str(out / "catalog.jsonl"), "--candidates", "vase-catalog-1006",
                 "--entries", f"{target.id},nobody", "--out", str(tmp_path / "x")]) == 2
    assert "catalog.jsonl: no target entry nobody" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--candidates and --entries go with --catalog"):
        main(["substitutes", "--candidates", "vase-catalog-1006", "--out", str(tmp_path / "x")])


def test_the_perfect_guard_catalog_hands_the_attacker_each_objectives_target_in_catalog_order(tmp_path):
    from tools.exp_substitute_ceiling import perfect_guard_catalog
    from train.catalog import load_catalog, load_images
    from train.encoder_guard import entry_samples

    out = tmp_path / "w"
    main(["world", "--out", str(out), "--classes", "person=5", "--protect", "3", "--images", "3", "--reference", "2"])
    lines = (out / "catalog.jsonl").read_text().splitlines(keepends=True)   # 3 protected, then 2 not
    (out / "catalog.jsonl").write_text("".join(lines[i] for i in (0, 3, 1, 2, 4)))   # one unprotected among them
    entries = load_catalog(out / "catalog.jsonl")
    last = max(k for k, e in enumerate(entries) if e.protected)
    assert last == 3 and not entries[1].protected
    perfect = load_catalog(perfect_guard_catalog(out / "catalog.jsonl", tmp_path / "perfect"))
    assert [e.id for e in perfect] == [e.id for e in entries[:last + 1]]       # same positions: same attack seeds
    for e, p in zip(entries, perfect):
        assert (p.protected, p.objective, p.reference_dir.resolve()) == (e.protected, e.objective, e.reference_dir.resolve())
        if not e.protected:
            assert p.images.resolve() == e.images.resolve()
            continue
        s = entry_samples([e])[0]
        want = s.targets.expand_as(s.images)
        assert (load_images(p.images, 64) - want).abs().max() <= 0.5 / 255 + 1e-6, e.objective
    assert {e.objective for e in perfect if e.protected} == {"pattern", "erasure", "target"}
