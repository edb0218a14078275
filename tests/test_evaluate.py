"""End to end: `persguard evaluate` writes the report SPEC section 5 promises, reproducibly."""
import json

import pytest

from tools.cli import main


def _run(world_catalog, out):
    assert main(["evaluate", "--model", "tiny-sd", "--catalog", str(world_catalog), "--suite", "smoke",
                 "--samples", "4", "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_evaluate_writes_the_promised_report_and_reruns_reproduce(world_catalog, tmp_path):
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

    again = _run(world_catalog, tmp_path / "b")
    assert [a["ism"] for a in again["attacks"]] == [a["ism"] for a in report["attacks"]]


def test_evaluate_rejects_an_unknown_suite(world_catalog, tmp_path, capsys):
    assert main(["evaluate", "--catalog", str(world_catalog), "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
