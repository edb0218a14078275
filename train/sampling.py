"""Sampling images from a diffusers SD/SDXL pipeline with the stock pipeline call, seeded and batched."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

SAMPLE_STEPS = 20
# diffusers' default for SD, what attackers use. Measured on the tiny world (one DreamBooth attack, 32
# samples): identity match at guidance 4.0 / 7.5 / 10: vase 0.47 / 0.72 / 0.75, person 0.72 / 0.81 / 0.69.
GUIDANCE = 7.5


def use_fast_sampler(pipe):
    """DPM-Solver++ for sampling (20 steps); training keeps the pipeline's DDPM noise schedule."""
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompt: str, n: int, seed: int, steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE,
           batch: int = 32) -> torch.Tensor:
    """n images for one prompt as a (n, 3, H, W) float tensor in [0, 1]."""
    use_fast_sampler(pipe)
    out = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        gen = torch.Generator().manual_seed(seed * 100_003 + start)
        images = pipe(prompt=[prompt] * k, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                      output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out).clamp(0, 1)


def mosaic(rows: list[torch.Tensor], per_row: int = 8) -> np.ndarray:
    """Image batches ((N, 3, H, W) in [0, 1]) as one HxWx3 uint8 grid; each batch starts a new row and
    wraps every `per_row` images (the last row of a batch padded white)."""
    tiles = []
    for images in rows:
        for start in range(0, len(images), per_row):
            chunk = images[start:start + per_row]
            tiles.append(torch.cat([chunk, torch.ones(per_row - len(chunk), *chunk.shape[1:])]))
    grid = torch.stack(tiles)  # (R, C, 3, H, W)
    r, c, _, h, w = grid.shape
    return (grid.permute(0, 3, 1, 4, 2).reshape(r * h, c * w, 3).numpy() * 255).round().astype(np.uint8)
