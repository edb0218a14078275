"""Prompt conditioning for SD-1.x- and SDXL-shaped UNets, with gradients (unlike the pipelines' encode_prompt).

Matches what the stock pipelines feed the UNet at sampling time: SD uses the last hidden state of its
text encoder; SDXL concatenates the penultimate hidden states of both encoders, adds the second
encoder's pooled projection and the size/crop `time_ids`.
"""
from __future__ import annotations

import torch


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(pipe, prompts: list[str], device=None) -> tuple[torch.Tensor, dict | None]:
    """Returns (encoder_hidden_states, added_cond_kwargs or None) for `unet(x, t, **unet_kwargs)`."""
    device = device or pipe.unet.device
    if not is_sdxl(pipe):
        ids = tokenize(pipe.tokenizer, prompts).to(device)
        return pipe.text_encoder(ids)[0], None
    out1 = pipe.text_encoder(tokenize(pipe.tokenizer, prompts).to(device), output_hidden_states=True)
    out2 = pipe.text_encoder_2(tokenize(pipe.tokenizer_2, prompts).to(device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=device)
    return hidden, {"text_embeds": out2.text_embeds, "time_ids": time_ids.repeat(len(prompts), 1)}


@torch.no_grad()
def encode_images(pipe, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of images in [0, 1], already multiplied by the scaling factor."""
    dist = pipe.vae.encode(images01.to(pipe.vae.device) * 2 - 1).latent_dist
    sf = pipe.vae.config.scaling_factor
    return dist.mean * sf, dist.std * sf


def unet_kwargs(hidden: torch.Tensor, added: dict | None) -> dict:
    kw = {"encoder_hidden_states": hidden}
    if added is not None:
        kw["added_cond_kwargs"] = added
    return kw


def select(hidden: torch.Tensor, added: dict | None, index) -> tuple[torch.Tensor, dict | None]:
    """Index a batch of encoded prompts (rows of hidden and of every added tensor)."""
    return hidden[index], None if added is None else {k: v[index] for k, v in added.items()}
