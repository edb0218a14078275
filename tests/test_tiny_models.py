"""The committed tiny pipelines: tokenizer round trip, stock loaders, save/reload, size budget."""
import json

import pytest
import torch
from transformers import CLIPTokenizer

from tools import tiny_models
from train.pipelines import EMBEDDED, load_pipeline, resolve_model
from train.sampling import sample

TEXTS = ["a photo of sks person", "A picture of OHWX cat, on a teal background!", "zwx vase 123 — ünïcode ✓"]


def _roundtrip(tok, text):
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_committed_tokenizer_round_trip(text):
    tok = CLIPTokenizer.from_pretrained(EMBEDDED["tiny-sd"] / "tokenizer")
    assert tok.model_max_length == 32
    # CLIP pre-tokenizes digits and punctuation apart, so decoding may add spaces; every character survives
    assert "".join(_roundtrip(tok, text).split()) == "".join(text.lower().split())


def test_bpe_files_alone_rebuild_the_same_tokenizer():
    folder = EMBEDDED["tiny-sd"] / "tokenizer"
    full = CLIPTokenizer.from_pretrained(folder)
    classic = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    for text in TEXTS:
        assert classic(text).input_ids == full(text).input_ids


def test_build_tokenizer_from_a_small_corpus(tmp_path):
    tok = tiny_models.build_tokenizer(["a photo of a person", "a red cat"] * 20, vocab_size=600, model_max_length=16)
    assert "sks" in _roundtrip(tok, "a photo of sks person")
    assert len(tok("a photo of a person").input_ids) == 7  # frequent words are single tokens
    tiny_models.save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 16
    assert (tmp_path / "merges.txt").read_text().startswith("#version")


def test_stock_pipelines_load_the_committed_folders():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd = StableDiffusionPipeline.from_pretrained(EMBEDDED["tiny-sd"])
    xl = StableDiffusionXLPipeline.from_pretrained(EMBEDDED["tiny-sdxl"])
    assert xl.text_encoder_2 is not None and xl.unet.config.addition_embed_type == "text_time"
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size


def test_committed_weights_fit_the_budget():
    from tests.conftest import REPO

    total = sum(p.stat().st_size for p in (REPO / "models").rglob("*") if p.is_file())
    assert total < 30 * 2 ** 20


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_save_and_reload_reproduce_samples(name, tmp_path):
    pipe = load_pipeline(name)
    before = sample(pipe, "a photo of a cat", 2, seed=3, steps=4)
    tiny_models.save_pipeline(pipe, tmp_path / name)
    after = sample(load_pipeline(tmp_path / name), "a photo of a cat", 2, seed=3, steps=4)
    assert before.shape == (2, 3, 64, 64)
    assert torch.allclose(before, after, atol=1e-5)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        resolve_model(tmp_path)


def test_committed_tokenizer_knows_the_attackers_wording():
    """The gray-box suite's words are whole tokens (learned from the pre-training captions), as in real CLIP."""
    tok = CLIPTokenizer.from_pretrained(EMBEDDED["tiny-sd"] / "tokenizer")
    for word in ("portrait", "close", "picture", "photo", "human", "kitty", "pot"):
        assert tok.tokenize(word) == [word + "</w>"], word
