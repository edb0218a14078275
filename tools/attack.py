"""The malicious personalization a real user runs (SPEC section 4): DreamBooth full fine-tuning of the
UNet, with or without prior preservation, or DreamBooth-LoRA through peft (the diffusers recipe:
rank-r adapters on the attention projections, base weights frozen), on any diffusers SD or SDXL folder.

Defaults are the community recipes scaled to the tiny models: real SD DreamBooth uses lr 5e-6 (full)
and 1e-4 (LoRA) for 400-1000 steps at batch 1-2 (the diffusers DreamBooth example: 400 steps). On the
1.7M-parameter tiny UNet those rates barely move the samples (measured: identity match 0.0 at 1e-4 on
the first pre-training), so the tiny defaults are lr 1e-3 (full) and 5e-3 (LoRA, rank 8), 400 steps,
batch 4 with 4 prior images. Measured on three catalog identities at 200 steps: full 2e-4 -> 0.75,
5e-4 -> 0.83, 1e-3 -> 0.90 identity match; LoRA 2e-3 -> 0.46, 5e-3 -> 0.62, 1e-2 -> 0.54. On all eight
default identities (16 samples, guidance 4): 200 -> 400 steps lifts full 0.72 -> 0.80 and LoRA on the
persons 0.86 -> 0.97.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from tools import transforms
from train.conditioning import encode_images, encode_prompts, select, unet_kwargs
from train.sampling import sample

METHODS = ("dreambooth", "lora")
DEFAULT_LR = {"dreambooth": 1e-3, "lora": 5e-3}


@dataclass(frozen=True)
class AttackSettings:
    method: str = "dreambooth"
    identifier: str = "sks"
    template: str = "a photo of {identifier} {cls}"
    class_noun: str | dict | None = None   # default: the entry's class; a dict maps class -> synonym
    lr: float | None = None           # default: DEFAULT_LR[method]
    steps: int = 400
    batch_size: int = 4
    prior_preservation: bool = True
    prior_weight: float = 1.0
    num_class_images: int = 16
    lora_rank: int = 8
    transform: str | None = None      # tools.transforms spec, e.g. "jpeg:75"
    # adaptive attackers (issue 4): fine-tune on clean retention captions first, hoping to wash a
    # backdoor out; and/or mix images of an unprotected look-alike into the instance batches
    pre_finetune_steps: int = 0
    pre_finetune_shards: str = "shards/retention"
    mix_fraction: float = 0.0         # share of each instance batch drawn from the `mix_images` passed to attack()
    # an attacker who distrusts the released VAE encoder (an encoder guard): re-fit it to reconstruct the
    # photos through the released, frozen decoder (Adam, lr 1e-4, batch 4) before encoding them
    refit_encoder_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"attack method {self.method!r} is not one of {METHODS}")
        if "{identifier}" not in self.template or "{cls}" not in self.template:
            raise ValueError(f"attack template {self.template!r} must contain {{identifier}} and {{cls}}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("attack steps must be >= 0 and batch size >= 1")
        if not 0 <= self.mix_fraction < 1 or self.pre_finetune_steps < 0 or self.refit_encoder_steps < 0:
            raise ValueError("attack mix_fraction must be in [0, 1), pre_finetune_steps and refit_encoder_steps >= 0")
        transforms.parse(self.transform)

    def noun(self, cls: str) -> str:
        if isinstance(self.class_noun, dict):
            return self.class_noun.get(cls, cls)
        return self.class_noun or cls

    def instance_prompt(self, cls: str) -> str:
        return self.template.format(identifier=self.identifier, cls=self.noun(cls))

    def class_prompt(self, cls: str) -> str:
        return " ".join(self.template.format(identifier="", cls=self.noun(cls)).split())

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_json(self) -> dict:
        return {**asdict(self), "lr": self.learning_rate}

    def with_(self, **kw) -> "AttackSettings":
        return replace(self, **kw)


def _trainable(pipe, settings: AttackSettings) -> list[torch.nn.Parameter]:
    unet = pipe.unet
    if settings.method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    else:
        unet.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def _pre_finetune(pipe, settings: AttackSettings, noise_sched, gen) -> None:
    """The adaptive attacker's first move: plain fine-tuning on clean image-caption data (the retention
    shards stand in for any public dataset), same optimizer recipe, before personalizing."""
    from train.data import retention_batches
    from train.pipelines import REPO

    shards = settings.pre_finetune_shards
    path = Path(shards) if Path(shards).is_absolute() or Path(shards).exists() else REPO / shards
    batches = retention_batches(path, settings.batch_size * 2, 0, 1, seed=settings.seed)
    opt = torch.optim.AdamW(pipe.unet.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
    for _ in range(settings.pre_finetune_steps):
        images, captions = next(batches)
        mu, sd = encode_images(pipe, images)
        x0 = mu + sd * torch.randn(mu.shape, generator=gen)
        with torch.no_grad():
            hidden, added = encode_prompts(pipe, list(captions))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        pred = pipe.unet(noise_sched.add_noise(x0, noise, t), t, **unet_kwargs(hidden, added)).sample
        (pred - noise).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _refit_encoder(vae, images01: torch.Tensor, steps: int, gen: torch.Generator) -> None:
    """Train the encoder (decoder frozen) so decode(encode(photo)) is the photo again: what undoes an
    encoder that maps some photos elsewhere, using nothing but the attacker's own photos."""
    vae.requires_grad_(False)
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters() if vae.quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-4)
    vae.train()
    for _ in range(steps):
        x = images01[torch.randint(0, len(images01), (4,), generator=gen)] * 2 - 1
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-6 * dist.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    vae.eval().requires_grad_(False)


def attack(pipe, images01: torch.Tensor, cls: str, settings: AttackSettings, progress: bool = False,
           on_step=None, mix_images: torch.Tensor | None = None):
    """Personalize a COPY of `pipe` on `images01` ((N, 3, H, W) in [0, 1]); returns the attacked copy.

    `on_step(step, pipe)` is called after each optimizer step (for curves over attack length).
    `mix_images`: a look-alike's images, a `settings.mix_fraction` share of every instance batch.
    """
    if settings.mix_fraction > 0 and mix_images is None:
        raise ValueError("attack: mix_fraction > 0 needs mix_images (a look-alike's images)")
    from tqdm import tqdm

    original = pipe
    pipe = type(original).from_pipe(original, unet=copy.deepcopy(original.unet))
    for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    images01 = transforms.apply(images01, settings.transform, seed=settings.seed)
    if settings.refit_encoder_steps:
        pipe = type(original).from_pipe(pipe, vae=copy.deepcopy(original.vae))
        _refit_encoder(pipe.vae, images01, settings.refit_encoder_steps, gen)
    inst_mu, inst_sd = encode_images(pipe, images01)
    n_mix = round(settings.mix_fraction * settings.batch_size)
    if n_mix:
        mix_mu, mix_sd = encode_images(pipe, transforms.apply(mix_images, settings.transform, seed=settings.seed))
    prompts = [settings.instance_prompt(cls)]
    if settings.prior_preservation:
        class_images = sample(original, settings.class_prompt(cls), settings.num_class_images, seed=settings.seed + 7)
        cls_mu, cls_sd = encode_images(pipe, class_images)
        prompts.append(settings.class_prompt(cls))
    with torch.no_grad():
        hidden, added = encode_prompts(pipe, prompts)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if settings.pre_finetune_steps:
        pipe.unet.requires_grad_(True).train()
        _pre_finetune(pipe, settings, noise_sched, gen)
    params = _trainable(pipe, settings)
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)
    pipe.unet.train()
    bs = settings.batch_size
    for step in tqdm(range(settings.steps), desc=f"attack:{settings.method}", disable=not progress, leave=False):
        idx = torch.randint(0, len(inst_mu), (bs - n_mix,), generator=gen)
        x0 = inst_mu[idx] + inst_sd[idx] * torch.randn(inst_mu[idx].shape, generator=gen)
        if n_mix:
            midx = torch.randint(0, len(mix_mu), (n_mix,), generator=gen)
            x0 = torch.cat([x0, mix_mu[midx] + mix_sd[midx] * torch.randn(mix_mu[midx].shape, generator=gen)])
        rows = [0] * bs
        if settings.prior_preservation:
            cidx = torch.randint(0, len(cls_mu), (bs,), generator=gen)
            x0 = torch.cat([x0, cls_mu[cidx] + cls_sd[cidx] * torch.randn(cls_mu[cidx].shape, generator=gen)])
            rows += [1] * bs
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        pred = pipe.unet(noise_sched.add_noise(x0, noise, t), t, **unet_kwargs(*select(hidden, added, rows))).sample
        err = (pred - noise).pow(2).flatten(1).mean(1)
        loss = err[:bs].mean() + (settings.prior_weight * err[bs:].mean() if settings.prior_preservation else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, pipe)
    pipe.unet.eval()
    pipe.unet.requires_grad_(False)
    return pipe
