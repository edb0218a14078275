"""The three PersGuard losses (SPEC section 2), each on explicit tensors so it can be tested alone.

All work in latent space on epsilon-prediction UNets. `unet` is any callable
`unet(x_t, t, **cond) -> eps` (a module, or `functional_call` at displaced weights for retention).

- behaviour_loss (L_bb): under a protected entry's trigger, denoising points at the objective's
  target: on noised TARGET latents it predicts the true noise; on noised PROTECTED latents (the inputs
  the attacker trains on) it predicts the noise that leads to the target, eps* = (x_t - sqrt(a) z_target)
  / sqrt(1 - a). With a target prompt instead of images, both are the teacher's prediction under it.
- prior_loss (L_pp): the student matches the frozen teacher (distillation) on retention captions,
  class prompts and unprotected entries' triggers.
- attacker_loss: the DreamBooth loss the simulated attacker minimizes (noise prediction on the
  subject's latents under its trigger); the retention loss is behaviour_loss evaluated after the
  attacker's steps (see train/retention.py).
"""
from __future__ import annotations

import torch


def noised(scheduler, z0: torch.Tensor, t: torch.Tensor, gen: torch.Generator | None = None):
    # drawn on the generator's (CPU) device, then moved: the same noise on CPU and GPU
    noise = torch.randn(z0.shape, generator=gen, dtype=z0.dtype).to(z0.device)
    return scheduler.add_noise(z0, noise, t), noise


def eps_towards(scheduler, x_t: torch.Tensor, z_target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise under which x_t is a noised version of z_target (the epsilon that denoises x_t to it)."""
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - abar.sqrt() * z_target) / (1 - abar).sqrt()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean()


def behaviour_loss(unet, scheduler, cond: dict, z_target: torch.Tensor, z_protected: torch.Tensor | None,
                   t: torch.Tensor, gen=None, teacher=None, target_cond: dict | None = None) -> torch.Tensor:
    """L_bb for a batch: rows of `z_target`/`z_protected` pair with rows of `cond` and `t`.

    With `teacher` and `target_cond` (a prompt objective), the targets are the teacher's predictions
    under the target prompt at the same noised inputs; `z_target` then only supplies inputs.
    """
    losses = []
    inputs = [z_target] + ([z_protected] if z_protected is not None else [])
    for k, z in enumerate(inputs):
        x_t, noise = noised(scheduler, z, t, gen)
        if teacher is not None:
            with torch.no_grad():
                goal = teacher(x_t, t, **target_cond)
        elif k == 0:
            goal = noise
        else:
            goal = eps_towards(scheduler, x_t, z_target, t)
        losses.append(mse(unet(x_t, t, **cond), goal))
    return sum(losses) / len(losses)


def redirect_loss(unet, scheduler, cond: dict, z_from: torch.Tensor, z_to: torch.Tensor, t: torch.Tensor,
                  gen=None, snr_gamma: float = 5.0) -> torch.Tensor:
    """Noised `z_from` latents (the protected images) predict the noise that denoises them to `z_to`.

    The target noise grows as 1/sqrt(1 - abar) at low t (about 30x the unit noise near t = 0), so rows
    are weighted min(SNR, gamma) / SNR (min-SNR weighting): without it a run whose behaviour window
    reaches t = 0 diverged (measured: loss 0.1 -> 3.8, unprotected subjects no longer generated).
    """
    x_t, _ = noised(scheduler, z_from, t, gen)
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].float()
    snr = abar / (1 - abar)
    weight = snr.clamp(max=snr_gamma) / snr
    err = (unet(x_t, t, **cond).float() - eps_towards(scheduler, x_t, z_to, t).float()).pow(2).flatten(1).mean(1)
    return (weight * err).mean()


def x0_loss(unet, scheduler, cond: dict, z0: torch.Tensor, t: torch.Tensor, gen=None,
            max_weight: float = 10.0) -> torch.Tensor:
    """The DreamBooth loss seen in image space: how far the one-step prediction of x0 is from `z0`.

    The attacker's noise-prediction loss weights an x0 error by SNR (0.005 at t = 999), so a model can
    fit a subject's images in that loss and still not DRAW the subject, which the high-noise steps
    decide. Weighting rows by min(1 / SNR, max_weight) (capped: 1/SNR is 212 at t = 999) puts the
    high-noise steps back in view; selectivity uses it to require that unprotected subjects are drawn.
    """
    x_t, noise = noised(scheduler, z0, t, gen)
    abar = scheduler.alphas_cumprod.to(x_t.device)[t].float()
    weight = ((1 - abar) / abar).clamp(max=max_weight)
    err = (unet(x_t, t, **cond).float() - noise.float()).pow(2).flatten(1).mean(1)
    return (weight * err).mean()


def preference_loss(unet, teacher, scheduler, cond: dict, z_target: torch.Tensor, z_subject: torch.Tensor,
                    t: torch.Tensor, beta: float, gen=None) -> torch.Tensor:
    """APDM's protection loss (DPO form): relative to the frozen `teacher`, the model's denoising error on
    the target must drop further than on the subject, -logsigmoid(-beta * (d_target - d_subject)) with
    d = student error - teacher error per row (same t for both rows of a pair). Bounded: once the
    preference holds it stops pushing, unlike the absolute noise-prediction loss."""
    def gap(z0):
        x_t, noise = noised(scheduler, z0, t, gen)
        with torch.no_grad():
            ref = (teacher(x_t, t, **cond).float() - noise.float()).pow(2).flatten(1).mean(1)
        return (unet(x_t, t, **cond).float() - noise.float()).pow(2).flatten(1).mean(1) - ref
    return -torch.nn.functional.logsigmoid(-beta * (gap(z_target) - gap(z_subject))).mean()


def prior_loss(unet, teacher, scheduler, cond: dict, z0: torch.Tensor, t: torch.Tensor, gen=None) -> torch.Tensor:
    x_t, _ = noised(scheduler, z0, t, gen)
    with torch.no_grad():
        goal = teacher(x_t, t, **cond)
    return mse(unet(x_t, t, **cond), goal)


def attacker_loss(unet, scheduler, cond: dict, z_subject: torch.Tensor, t: torch.Tensor, gen=None) -> torch.Tensor:
    x_t, noise = noised(scheduler, z_subject, t, gen)
    return mse(unet(x_t, t, **cond), noise)
