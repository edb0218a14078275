"""Pre-train the embedded tiny pipelines on the world's `pretrain` identities (CPU, no downloads).

Stages: render the data set, build the BPE tokenizer from its captions, train the VAE, encode latents
once, then train text encoder(s) + UNet of the SD-shaped and the SDXL-shaped pipeline with the plain
epsilon-prediction loss. Both pipelines share the VAE. Output: `OUT/tiny-sd`, `OUT/tiny-sdxl`
(save_pretrained folders) and `OUT/pretrain.json` (timings and final losses).
"""
from __future__ import annotations

import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from tools import tiny_models, world
from train.conditioning import encode_prompts, unet_kwargs


def _render_one(args):
    cls, index, views, seed = args
    ident = world.identity(cls, "pretrain", index, seed)
    return [(np.asarray(world.render(ident, v)[0]), world.caption(ident, v)) for v in range(views)]


def render_dataset(per_class: int, views: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    jobs = [(c, i, views, seed) for c in world.CLASSES for i in range(per_class)]
    with Pool(2) as pool:
        rows = list(tqdm(pool.imap(_render_one, jobs, chunksize=32), total=len(jobs), desc="render"))
    pairs = [p for row in rows for p in row]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    return images, [p[1] for p in pairs]


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def train_vae(vae, images: torch.Tensor, cfg: dict, gen: torch.Generator) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"])
    bar = tqdm(range(cfg["steps"]), desc="vae")
    for step in bar:
        idx = torch.randint(0, len(images), (cfg["batch_size"],), generator=gen)
        x = to_model_range(images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = (rec - x).abs().mean() + 0.5 * (rec - x).pow(2).mean() + cfg["kl_weight"] * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return float(loss)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(to_model_range(images[i:i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])


def train_diffusion(pipe, latents: torch.Tensor, captions: list[str], cfg: dict, gen: torch.Generator,
                    desc: str) -> float:
    """Text encoder(s) + UNet, epsilon loss; `latents` already scaled by the VAE's scaling factor."""
    modules = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * s / cfg["steps"])))
    noise_sched = pipe.scheduler
    bar = tqdm(range(cfg["steps"]), desc=desc)
    ema = None
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg["batch_size"],), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(len(idx), generator=gen) < cfg["caption_dropout"]
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        hidden, added = encode_prompts(pipe, prompts)
        loss = (pipe.unet(xt, t, **unet_kwargs(hidden, added)).sample - noise).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    for m in modules:
        m.eval()
    return float(ema)


def pretrain(config: Path, out: Path, only: tuple[str, ...] = ("sd", "sdxl"), vae_from: Path | None = None) -> dict:
    """Every stage draws from its own generator (seed, stage), so a stage run alone (`only`, `vae_from`: a
    trained VAE folder instead of training one) draws what it draws in a full run (tests/test_pretrain.py).
    The BPE trainer numbers tied symbols in hash order, so two runs may number tokens differently; each
    pipeline is consistent with the tokenizer it is saved with. The report is merged into an existing
    OUT/pretrain.json, so stages run apart leave one report."""
    cfg = yaml.safe_load(Path(config).read_text())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report, t0 = {"config": cfg, "seconds": {}}, time.time()

    images, captions = render_dataset(cfg["data"]["per_class"], cfg["data"]["views"], cfg["seed"])
    report["seconds"]["render"] = time.time() - t0
    report["images"] = len(images)

    corpus = captions + [f"a photo of a {c}" for c in world.CLASSES]
    tok = tiny_models.build_tokenizer(corpus, cfg["tokenizer"]["vocab_size"], cfg["tokenizer"]["model_max_length"])

    t = time.time()
    if vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_from)
        report["vae_from"] = str(vae_from)
    else:
        torch.manual_seed(cfg["seed"])
        vae = tiny_models.build_vae(cfg["vae"])
        report["vae_loss"] = train_vae(vae, images, cfg["vae"], torch.Generator().manual_seed(cfg["seed"]))
        vae.eval()
    raw = encode_latents(vae, images)
    if vae_from is None:
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    latents = raw * vae.config.scaling_factor
    report["seconds"]["vae"] = time.time() - t
    latent_size = latents.shape[-1]

    builders = {"sd": tiny_models.build_sd, "sdxl": tiny_models.build_sdxl}
    for kind in only:
        t = time.time()
        torch.manual_seed(cfg["seed"])
        gen = torch.Generator().manual_seed(cfg["seed"] + 1 + list(builders).index(kind))
        pipe = builders[kind](cfg[kind], tok, vae, latent_size)
        report[f"{kind}_loss"] = train_diffusion(pipe, latents, captions, cfg["diffusion"], gen, desc=kind)
        tiny_models.save_pipeline(pipe, out / f"tiny-{kind}")
        report["seconds"][kind] = time.time() - t
    report["seconds"]["total"] = time.time() - t0
    path = out / "pretrain.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    if vae_from is None:
        merged.pop("vae_from", None)      # this run trained the VAE the pipelines carry
    merged.update({k: v for k, v in report.items() if k != "seconds"})
    merged["seconds"] = {**merged.get("seconds", {}), **report["seconds"]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    return report
