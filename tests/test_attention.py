"""The attention backend switch: SDPA everywhere, xformers only where it can run, clear errors otherwise."""
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from train.attention import resolve, set_attention, xformers_available
from train.config import ConfigError, load_config
from train.pipelines import load_pipeline


def test_auto_on_cpu_is_sdpa_and_the_output_is_unchanged():
    unet = load_pipeline("tiny-sd").unet
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim)
    before = unet(x, t, encoder_hidden_states=h).sample
    assert set_attention(unet, "auto") == "sdpa"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert torch.allclose(unet(x, t, encoder_hidden_states=h).sample, before, atol=1e-5)


def test_xformers_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ValueError, match="xformers needs a CUDA device"):
        resolve("xformers", "cpu")
    if not xformers_available():
        with pytest.raises(ValueError, match="not importable"):
            resolve("xformers", "cuda:0")
    with pytest.raises(ConfigError, match="attention: 'flash' is not"):
        load_config(None, ["catalog=x.jsonl", "attention=flash"])
