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


@pytest.mark.skipif(not (torch.cuda.is_available() and xformers_available("cuda")),
                    reason="needs CUDA and an xformers build whose kernels run there")
def test_on_cuda_auto_picks_xformers_and_matches_sdpa():
    unet = load_pipeline("tiny-sd").unet.to("cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t, h = torch.tensor([500, 20], device="cuda"), torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda")
    assert set_attention(unet, "sdpa") == "sdpa"
    sdpa = unet(x, t, encoder_hidden_states=h).sample
    assert set_attention(unet, "auto") == "xformers"
    assert not any(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert torch.allclose(unet(x, t, encoder_hidden_states=h).sample, sdpa, atol=1e-3)
