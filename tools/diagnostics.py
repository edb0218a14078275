"""Why protection holds or fails, per noise level (SPEC section 7 diagnostics).

- attacker_loss: the white-box attacker's DreamBooth loss (noise prediction on the protected entry's own
  latents under its trigger) in timestep buckets. If implanting raises it, the attacker has a large
  gradient to follow and erases the backdoor quickly; a backdoor that leaves it low is hard to find.
- backdoor_acts: per bucket, the fraction of noised protected latents whose one-step x0 prediction
  under the trigger lies closer to the objective's target latents than to the entry's own latents
  (image targets only: pattern, or erasure with background renders). It shows at which noise levels the
  backdoor decides what is drawn.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from train import objectives
from train.catalog import Entry, load_images
from train.conditioning import encode_images, encode_prompts, select, unet_kwargs

BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def _key(lo: int, hi: int) -> str:
    return f"t{lo}-{hi}"


@torch.no_grad()
def diagnose(pipe, entry: Entry, prompt: str, n: int = 32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    mu, sd = encode_images(pipe, load_images(entry.images, 64))
    obj = objectives.resolve(entry) if entry.protected else None
    target = encode_images(pipe, obj.images)[0] if obj is not None and obj.images is not None else None
    hidden, added = encode_prompts(pipe, [prompt])
    loss, acts = {}, {}
    for lo, hi in BUCKETS:
        idx = torch.randint(0, len(mu), (n,), generator=gen)
        z0 = mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(lo, hi, (n,), generator=gen)
        x_t = sched.add_noise(z0, noise, t)
        cond = unet_kwargs(*select(hidden, added, [0] * n))
        eps = pipe.unet(x_t, t, **cond).sample
        loss[_key(lo, hi)] = float((eps - noise).pow(2).mean())
        if target is not None:
            abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
            to_target = torch.cdist(x0.flatten(1), target.flatten(1)).min(1).values
            to_self = (x0 - z0).flatten(1).norm(dim=1)
            acts[_key(lo, hi)] = float((to_target < to_self).float().mean())
    return {"attacker_loss": loss, "backdoor_acts": acts or None}
