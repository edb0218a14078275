"""The perturbation baseline (issue 4): ASPL, the Anti-DreamBooth defence (Van Le et al., ICCV 2023), on
our own code, against any diffusers SD/SDXL pipeline (the ORIGINAL model: ASPL protects images, not models).

ASPL alternates, `rounds` times:
  1. clone the surrogate UNet and fine-tune the clone on the CLEAN images (what a well-trained attacker
     would converge to), `surrogate_steps` DreamBooth steps;
  2. PGD on the perturbations against that clone: `pgd_steps` signed-gradient ascent steps of size `alpha`
     on the DreamBooth loss of the perturbed images (through the VAE encoder), projected to the L-inf ball
     of radius `budget` around the clean images and to [0, 1];
  3. fine-tune the surrogate itself on the PERTURBED images for `surrogate_steps` (it tracks the attacker
     who trains on them).
Perturbed images are saved as PNG (8-bit, what an attacker scrapes), and a catalog is written whose
entries point at them while their `reference` stays the clean folder, so `persguard evaluate --catalog`
attacks the perturbed photos and judges against the clean identity.

    persguard aspl --catalog CATALOG [--budget 8] [--entries ID,...] --out DIR
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tqdm import tqdm

from tools.attack import DEFAULT_LR
from train.catalog import list_images, load_catalog, load_images
from train.conditioning import encode_prompts, unet_kwargs
from train.losses import attacker_loss
from train.pipelines import load_pipeline


@dataclass(frozen=True)
class ASPLSettings:
    budget: float = 8.0            # L-inf radius in 8-bit pixel units (8/255 or 16/255 in the issue)
    alpha: float = 1.0             # PGD step in pixel units
    rounds: int = 30               # ASPL alternations
    pgd_steps: int = 6             # PGD steps per round (Anti-DreamBooth: 6)
    surrogate_steps: int = 3       # DreamBooth steps of the surrogate per round (Anti-DreamBooth: 3)
    lr: float = DEFAULT_LR["dreambooth"]   # the surrogate's lr: the attack default of the tiny models
    batch_size: int = 4
    template: str = "a photo of {identifier} {cls}"
    identifier: str = "sks"
    seed: int = 0


def _denoising_loss(pipe, unet, images01: torch.Tensor, cond: dict, sched, gen: torch.Generator) -> torch.Tensor:
    """The attacker's DreamBooth loss on images in [0, 1], differentiable w.r.t. the images and the UNet."""
    latents = pipe.vae.encode(images01 * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen)
    return attacker_loss(lambda x, tt, **c: unet(x, tt, **c).sample, sched, cond, latents, t, gen)


def _finetune(pipe, unet, images01: torch.Tensor, cond_of, sched, gen, steps: int, lr: float, bs: int, opt=None):
    opt = opt or torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(images01), (min(bs, len(images01)),), generator=gen)
        loss = _denoising_loss(pipe, unet, images01[idx].detach(), cond_of(len(idx)), sched, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def perturb(pipe, images01: torch.Tensor, cls: str, settings: ASPLSettings, progress: bool = False) -> torch.Tensor:
    """ASPL-perturbed copies of `images01` ((N, 3, H, W) in [0, 1]), quantized to 8 bits."""
    gen = torch.Generator().manual_seed(settings.seed)
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        hidden, added = encode_prompts(pipe, [settings.template.format(identifier=settings.identifier, cls=cls)])

    def cond_of(n):
        return unet_kwargs(hidden.expand(n, -1, -1), None if added is None else {k: v.expand(n, -1) for k, v in added.items()})

    surrogate = copy.deepcopy(pipe.unet).requires_grad_(True).train()
    sur_opt = None
    eps, step = settings.budget / 255.0, settings.alpha / 255.0
    clean = images01.clone()
    adv = clean.clone()
    for _ in tqdm(range(settings.rounds), desc="aspl", disable=not progress, leave=False):
        clone = copy.deepcopy(surrogate)
        _finetune(pipe, clone, clean, cond_of, sched, gen, settings.surrogate_steps, settings.lr, settings.batch_size)
        clone.requires_grad_(False)
        for _ in range(settings.pgd_steps):
            adv.requires_grad_(True)
            loss = _denoising_loss(pipe, clone, adv, cond_of(len(adv)), sched, gen)
            (grad,) = torch.autograd.grad(loss, [adv])
            with torch.no_grad():
                adv = (clean + (adv + step * grad.sign() - clean).clamp(-eps, eps)).clamp(0, 1)
        adv = (adv.detach() * 255).round() / 255   # what is saved and scraped: 8-bit pixels
        sur_opt = _finetune(pipe, surrogate, adv, cond_of, sched, gen, settings.surrogate_steps, settings.lr,
                            settings.batch_size, sur_opt)
    return adv


def protect_catalog(catalog: Path | None, out: Path, settings: ASPLSettings, model: str = "tiny-sd",
                    entries: list[str] | None = None, progress: bool = True) -> Path:
    """Perturb the images of the chosen entries (default: the protected ones) and write OUT/catalog.jsonl:
    the same entries, the perturbed ones pointing at OUT/<id>/images, references unchanged (clean)."""
    if catalog is None:
        from tools.evaluate import default_catalog
        catalog = default_catalog()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_entries = load_catalog(Path(catalog))
    chosen = set(entries) if entries else {e.id for e in all_entries if e.protected}
    unknown = chosen - {e.id for e in all_entries}
    if unknown:
        raise ValueError(f"{catalog}: no entries {sorted(unknown)}")
    pipe = load_pipeline(model)
    rows, stats = [], {}
    for e in tqdm(all_entries, desc="aspl entries", disable=not progress):
        row = e.to_json()
        row["reference"] = str(Path(e.reference_dir).resolve())
        if e.backgrounds is not None:
            row["backgrounds"] = str(Path(e.backgrounds).resolve())
        row["images"] = str(Path(e.images).resolve())
        if e.id in chosen:
            clean = load_images(e.images, 64)
            adv = perturb(pipe, clean, e.cls, settings)
            folder = out / e.id / "images"
            folder.mkdir(parents=True, exist_ok=True)
            for src, img in zip(list_images(e.images), adv):
                arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{Path(src).stem}.png")
            row["images"] = str(folder.resolve())
            row["aspl"] = {"budget": settings.budget}
            stats[e.id] = {"linf": float((adv - clean).abs().max() * 255), "mean_abs": float((adv - clean).abs().mean() * 255)}
        rows.append(row)
    path = out / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "aspl.json").write_text(json.dumps({"settings": asdict(settings), "model": model, "source": str(catalog),
                                               "perturbation_pixels": stats}, indent=1))
    return path
