"""Issue 4's machinery: the threat-model suites, the ASPL perturbation baseline and the side-by-side table."""
import json

import pytest
import torch
import yaml

from tools.aspl import ASPLSettings, perturb
from tools.cli import main
from tools.evaluate import REPO, THREAT_SUITES, load_suite
from train.catalog import load_catalog, load_images
from train.pipelines import load_pipeline


def test_threat_suites_load_and_gray_box_is_held_out_from_training():
    for name in THREAT_SUITES:
        _, attacks, _ = load_suite(name)
        assert attacks
    assert len(load_suite("all")[1]) == sum(len(load_suite(n)[1]) for n in THREAT_SUITES) - 1  # one shared row
    train = yaml.safe_load((REPO / "configs" / "gray-box.yaml").read_text())
    t, r = train["trigger"], train["retention"]
    nouns = {n for ns in t["class_nouns"].values() for n in ns}
    for a in load_suite("gray-box")[1]:
        assert a.identifier not in t["identifiers"] and a.template not in t["templates"]
        assert not isinstance(a.class_noun, dict) or not set(a.class_noun.values()) & nouns
        assert a.learning_rate not in r["inner_lrs"] and a.steps not in r["horizons"]


def test_aspl_perturbation_stays_in_budget_and_raises_the_denoising_loss(world_catalog):
    entry = load_catalog(world_catalog)[0]
    clean = load_images(entry.images, 64)
    adv = perturb(load_pipeline("tiny-sd"), clean, entry.cls, ASPLSettings(budget=8, rounds=2, pgd_steps=3))
    diff = (adv - clean).abs()
    assert diff.max() <= 8 / 255 + 1e-6 and diff.mean() > 2 / 255            # used, and within the L-inf ball
    assert torch.equal(adv, (adv * 255).round() / 255) and 0 <= adv.min() and adv.max() <= 1   # 8-bit pixels


@pytest.mark.slow
def test_aspl_catalog_evaluates_and_compares_beside_the_clean_one(world_catalog, tmp_path):
    rows = [json.loads(x) for x in world_catalog.read_text().splitlines()]
    rows = [r for r in rows if r["class"] == "person"]   # the look-alike attack needs two of a class
    rows[0].update(protected=True, objective="pattern")
    cat = tmp_path / "catalog.jsonl"
    cat.write_text("".join(json.dumps({**r, **{k: str(world_catalog.parent / r[k]) for k in ("images", "reference",
                                                                                       "backgrounds") if r.get(k)}})
                           + "\n" for r in rows))
    assert main(["aspl", "--catalog", str(cat), "--rounds", "1", "--out", str(tmp_path / "aspl")]) == 0
    perturbed = load_catalog(tmp_path / "aspl" / "catalog.jsonl")
    assert perturbed[0].images != load_catalog(cat)[0].images and perturbed[0].reference_dir == load_catalog(cat)[0].reference_dir
    assert perturbed[1].images == load_catalog(cat)[1].images                  # unprotected entries untouched
    for name, catalog in (("none", cat), ("aspl", tmp_path / "aspl" / "catalog.jsonl")):
        assert main(["evaluate", "--catalog", str(catalog), "--suite", "smoke-threats", "--samples", "2",
                     "--out", str(tmp_path / name)]) == 0
    assert main(["compare", "--report", f"none={tmp_path / 'none'}", "--report", f"aspl={tmp_path / 'aspl'}",
                 "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert result["columns"] == ["none", "aspl"] and len(result["rows"]) == 3
    for row in result["rows"]:
        assert set(row["cells"]) == {"none", "aspl"} and (tmp_path / "cmp" / row["grid"]).is_file()
        assert 0 <= row["cells"]["aspl"]["protected_identity_match"] <= 1
    assert "transform=jpeg:75" in (tmp_path / "cmp" / "report.md").read_text()
    assert main(["compare", "--report", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "c2")]) == 2
    assert main(["evaluate", "--catalog", str(world_catalog), "--suite", "smoke-threats", "--out",
                 str(tmp_path / "lone")]) == 2   # the lone cat has no look-alike: refused before any attack
    assert not (tmp_path / "lone" / "report.json").exists()


def _record(entry, protected, attack, identity, bsr):
    return {"entry": entry, "protected": protected, "objective": "pattern" if protected else None,
            "method": "dreambooth", "attack": attack, "multiple": 1, "identity_match": identity, "bsr": bsr}


def test_compare_takes_the_original_of_a_baseline_run_as_a_column(tmp_path):
    """One `evaluate --baseline` run gives both columns: FOLDER (protected model) and FOLDER:baseline."""
    rows = [("a", True, "jpeg", 0.0, 1.0), ("b", False, "jpeg", 0.75, None)]
    base = [("a", True, "jpeg", 0.9, 0.0), ("b", False, "jpeg", 0.5, None)]
    rep = {"suite": "transforms", "model": "guarded", "baseline": "tiny-sd", "catalog": "c.jsonl",
           "attacks": [_record(*r) for r in rows], "baseline_attacks": [_record(*r) for r in base],
           "summary": {"unprotected": {"fidelity_ratio": 1.5}, "clean": {"class_accuracy": 1.0, "frechet": 0.0},
                       "unrelated": {"identity_match": 0.0}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps(rep))
    assert main(["compare", "--report", f"pg={tmp_path / 'run'}", "--report", f"none={tmp_path / 'run'}:baseline",
                 "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "report.json").read_text())
    cells = result["rows"][0]["cells"]
    assert (cells["pg"]["protected_identity_match"], cells["pg"]["protected_bsr"]) == (0.0, 1.0)
    assert (cells["none"]["protected_identity_match"], cells["none"]["unprotected_identity_match"]) == (0.9, 0.5)
    assert result["per_report"]["none"]["model"] == "tiny-sd"
    del rep["baseline_attacks"]
    (tmp_path / "run" / "report.json").write_text(json.dumps(rep))
    assert main(["compare", "--report", f"none={tmp_path / 'run'}:baseline", "--out", str(tmp_path / "c2")]) == 2
