"""Attention backend of the trained UNet: `attention: auto | xformers | sdpa` in the run config.

auto picks xformers' memory-efficient kernels when xformers imports and the model is on CUDA, PyTorch's
scaled_dot_product_attention otherwise. Asking for xformers where it cannot run is an error, not a
silent fallback: a run sized for xformers' memory could otherwise die hours later.
"""
from __future__ import annotations

BACKENDS = ("auto", "xformers", "sdpa")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:   # ImportError, or a wheel built for another torch/CUDA
        return False
    return True


def resolve(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention: {backend!r} is not one of {', '.join(BACKENDS)}")
    on_cuda = str(device).startswith("cuda")
    if backend == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if backend == "xformers":
        if not on_cuda:
            raise ValueError(f"attention: xformers needs a CUDA device; the model is on {device}")
        if not xformers_available():
            raise ValueError("attention: xformers is not importable here (install it, e.g. conda env from "
                             "environment.yml, or use attention: sdpa)")
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
