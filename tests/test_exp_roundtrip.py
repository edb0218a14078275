"""The round-trip screen (tools/exp_roundtrip.py) on real guards: the unguarded encoder and a broken one."""
import json

import pytest
import torch

from tools import exp_roundtrip
from train.catalog import load_catalog, write_catalog
from train.pipelines import load_pipeline


def test_the_screen_tells_a_face_that_round_trips_from_one_that_does_not(world_catalog, tmp_path):
    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="erasure")
    cat = tmp_path / "catalog.jsonl"
    write_catalog(rows, cat)
    vae = load_pipeline("tiny-sd").vae
    torch.save({"guard": {"vae": vae.state_dict(), "seconds": 12.0}}, tmp_path / "unguarded.pt")
    with torch.no_grad():   # an encoder that sends every photo to the same latent: no face survives
        vae.quant_conv.weight.zero_()
    torch.save({"guard": {"vae": vae.state_dict(), "seconds": 30.0}}, tmp_path / "broken.pt")
    torch.save({"step": 3}, tmp_path / "other.pt")

    exp_roundtrip.main([str(cat), str(tmp_path / "unguarded.pt"), str(tmp_path / "broken.pt"),
                        "--out", str(tmp_path / "screen.json")])
    result = json.loads((tmp_path / "screen.json").read_text())
    kept, broken = result[str(tmp_path / "unguarded.pt")], result[str(tmp_path / "broken.pt")]
    assert kept["seconds"] == 12.0 and broken["seconds"] == 30.0
    person = rows[1]["id"]
    assert kept["entries"][person]["match"] >= 0.6 and broken["entries"][person]["match"] == 0.0
    assert kept["summary"]["protected"]["match"] > broken["summary"]["protected"]["match"]
    with pytest.raises(ValueError, match="other.pt: not an encoder-guard checkpoint"):
        exp_roundtrip.main([str(cat), str(tmp_path / "other.pt")])
