"""Attention backend of the trained UNet: `attention: auto | xformers | sdpa` in the run config.

auto picks xformers' memory-efficient kernels when xformers imports and the model is on CUDA, PyTorch's
scaled_dot_product_attention otherwise. Asking for xformers where it cannot run is an error, not a
silent fallback: a run sized for xformers' memory could otherwise die hours later.
"""
from __future__ import annotations

import functools

BACKENDS = ("auto", "xformers", "sdpa")


@functools.lru_cache(maxsize=None)
def xformers_available(device: str | None = None) -> bool:
    """xformers imports and, given a CUDA device, its attention kernel runs there. A wheel built for another
    torch or CUDA imports fine and fails only at the first call (seen on an H200: xformers 0.0.35, built for
    torch 2.10 + CUDA 12.8, under torch 2.11 + CUDA 13.0), so `auto` must not take importing as proof."""
    try:
        import xformers.ops
    except Exception:   # ImportError, or a broken install
        return False
    if device is None or not device.startswith("cuda"):
        return True
    try:
        import torch

        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception:   # NotImplementedError "No operator found", a CUDA error
        return False
    return True


def resolve(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention: {backend!r} is not one of {', '.join(BACKENDS)}")
    on_cuda = str(device).startswith("cuda")
    if backend == "auto":
        return "xformers" if on_cuda and xformers_available(str(device)) else "sdpa"
    if backend == "xformers":
        if not on_cuda:
            raise ValueError(f"attention: xformers needs a CUDA device; the model is on {device}")
        if not xformers_available(str(device)):
            raise ValueError(f"attention: xformers is not importable here or its kernels do not run on {device} "
                             "(install the build for this torch and CUDA, e.g. conda env from environment.yml, "
                             "or use attention: sdpa)")
    return backend


def set_attention(unet, backend: str) -> str:
    """Switch every attention layer of `unet` to the resolved backend; returns its name."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    chosen = resolve(backend, unet.device)
    if chosen == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())
    return chosen
