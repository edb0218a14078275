"""tools/pretrain.py: a stage run alone trains what it trains in a full run; the report merges."""
import json

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tools import pretrain as pt


def test_one_pipeline_on_a_trained_vae_is_the_full_runs_bit_for_bit(tmp_path, monkeypatch):
    cfg = yaml.safe_load((REPO / "configs" / "pretrain.yaml").read_text())
    cfg["data"] = {"per_class": 2, "views": 1}
    cfg["vae"]["steps"] = 2
    cfg["diffusion"].update(steps=3, warmup=1, batch_size=4)
    (tmp_path / "pt.yaml").write_text(yaml.safe_dump(cfg))
    # the BPE trainer numbers tied symbols in hash order, so every run here shares the first run's tokenizer:
    # what is checked is that a stage's random numbers do not depend on which other stages ran
    build, cache = pt.tiny_models.build_tokenizer, []

    def first_tokenizer(*args):
        if not cache:
            cache.append(build(*args))
        return cache[0]

    monkeypatch.setattr(pt.tiny_models, "build_tokenizer", first_tokenizer)
    full = pt.pretrain(tmp_path / "pt.yaml", tmp_path / "full")
    vae = tmp_path / "full" / "tiny-sd" / "vae"
    alone = pt.pretrain(tmp_path / "pt.yaml", tmp_path / "alone", only=("sdxl",), vae_from=vae)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "full" / "tiny-sdxl" / part), load_file(tmp_path / "alone" / "tiny-sdxl" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert alone["sdxl_loss"] == full["sdxl_loss"]
    vae_cfg = json.loads((tmp_path / "alone" / "tiny-sdxl" / "vae" / "config.json").read_text())
    assert "_name_or_path" not in vae_cfg        # no build machine's folder in a committed config
    assert vae_cfg["scaling_factor"] == json.loads((vae / "config.json").read_text())["scaling_factor"]
    # a second stage into the same folder merges its report
    pt.pretrain(tmp_path / "pt.yaml", tmp_path / "alone", only=("sd",), vae_from=vae)
    report = json.loads((tmp_path / "alone" / "pretrain.json").read_text())
    assert {"sd", "sdxl"} <= set(report["seconds"]) and "sd_loss" in report and "sdxl_loss" in report
    assert report["vae_from"] == str(vae)
