"""Encoder guard: a backdoor in the VAE encoder, the one part of the released model every stock
personalization recipe uses and none trains.

DreamBooth, DreamBooth-LoRA, textual inversion and their community scripts freeze the VAE and train on
`vae.encode(photo)`. The guard fine-tunes the encoder (decoder frozen) so that a protected subject's
photos encode to the objective's latents (the pattern; the same view without the subject; the
substitute) while every other image encodes as before. The attacker's UNet then learns the protective
output from its own training data, for as many steps as it likes: nothing in the attack pulls it back.
The UNet and the decoder are untouched, so ordinary text-to-image generation is exactly the original's.

This departs from SPEC section 2 ("VAE frozen") on purpose; README "The encoder guard" says why
and what it does not cover: an attacker who re-fits or replaces the encoder (measured there).

To work on photos the publisher never saw, training sees each protected image under random pose
changes (shift, scale, rotation, flip), lighting (brightness, per-channel gain) and the degradations
scrapers apply (JPEG, blur, down-up resizing, noise), with continuous strengths, not the evaluation's.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tools import transforms


@dataclass
class GuardSample:
    """One protected entry: its images, per image the image it must encode as ((N, 3, H, W) in [0, 1]),
    where known the subject's masks ((N, 1, H, W), from background renders) for pasting it elsewhere, and
    per target the share of it that stays when the photo is pasted elsewhere (`target_masks`: 1 for a
    pattern, 0 for an erasure background, the substitute's silhouette for a transplanted substitute)."""
    entry_id: str
    objective: str
    images: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor | None = None
    target_masks: torch.Tensor | None = None
    moves_with_subject: bool = False   # the target follows a pose change (an erasure background, a transplant)


def subject_masks(images: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """Soft masks of what differs from the subject-free twins: the subject."""
    diff = (images - backgrounds).abs().amax(1, keepdim=True)
    return F.avg_pool2d((diff > 0.04).float(), 3, 1, 1).clamp(0, 1)   # soft edge


def _box(mask: torch.Tensor) -> tuple[float, float, float] | None:
    """(centre x, centre y, size) of a (1, H, W) mask in grid_sample's [-1, 1] coordinates."""
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if len(ys) == 0:
        return None
    h, w = mask.shape[-2:]
    y0, y1 = (ys.min().item() + 0.5) / h * 2 - 1, (ys.max().item() + 0.5) / h * 2 - 1
    x0, x1 = (xs.min().item() + 0.5) / w * 2 - 1, (xs.max().item() + 0.5) / w * 2 - 1
    return (x0 + x1) / 2, (y0 + y1) / 2, max(y1 - y0, x1 - x0)


def transplant(masks: torch.Tensor, backgrounds: torch.Tensor, substitutes: torch.Tensor,
               substitute_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per protected photo, its own background with a substitute (cycled) moved and scaled onto the
    box the protected subject occupies: a target that follows the subject, so the encoder learns a local
    map (this face becomes that face, where it stands) instead of one fixed picture from any pose.
    Returns (targets, their substitute masks), or None where a mask is empty."""
    out, out_masks = [], []
    for i in range(len(masks)):
        j = i % len(substitutes)
        a, b = _box(masks[i]), _box(substitute_masks[j])
        if a is None or b is None:
            return None
        k = b[2] / a[2]
        theta = torch.tensor([[[k, 0.0, b[0] - k * a[0]], [0.0, k, b[1] - k * a[1]]]])
        sub = torch.cat([substitutes[j:j + 1], substitute_masks[j:j + 1]], 1)
        grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
        moved = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = moved[:, 3:]
        out.append(m * moved[:, :3] + (1 - m) * backgrounds[i:i + 1])
        out_masks.append(m)
    return torch.cat(out), torch.cat(out_masks)


def guard_sample(entry_id: str, objective: str, images: torch.Tensor, target_images: torch.Tensor | None,
                 backgrounds: torch.Tensor | None = None,
                 target_backgrounds: torch.Tensor | None = None) -> GuardSample:
    """What each protected photo encodes as: the pattern, its own background render (erasure, same view),
    or a substitute: transplanted onto the photo's background where both have subject-free twins
    (`backgrounds`, `target_backgrounds`), else the first substitute image."""
    if target_images is None:
        raise ValueError(f"encoder guard: entry {entry_id!r} ({objective}) needs target images (pattern, "
                         "backgrounds or substitute images); a prompt-only target cannot be encoded")
    if objective == "erasure":
        if len(target_images) != len(images):
            raise ValueError(f"encoder guard: entry {entry_id!r}: erasure needs one background per image "
                             f"({len(target_images)} for {len(images)} images)")
        backgrounds = target_images
    masks = None
    if backgrounds is not None and len(backgrounds) == len(images):
        masks = subject_masks(images, backgrounds)
    if objective == "erasure":
        return GuardSample(entry_id, objective, images, target_images, masks, torch.zeros_like(masks), True)
    fixed = target_images[:1].expand(len(images), -1, -1, -1)
    if objective == "target" and masks is not None and target_backgrounds is not None:
        if len(target_backgrounds) != len(target_images):
            raise ValueError(f"encoder guard: entry {entry_id!r}: {len(target_backgrounds)} substitute "
                             f"backgrounds for {len(target_images)} substitute images (one per image)")
        moved = transplant(masks, backgrounds, target_images, subject_masks(target_images, target_backgrounds))
        if moved is not None:
            return GuardSample(entry_id, objective, images, moved[0], masks, moved[1], True)
    return GuardSample(entry_id, objective, images, fixed, masks, torch.ones_like(images[:, :1]))


def _moments(vae, images01: torch.Tensor) -> torch.Tensor:
    """The encoder's raw posterior parameters (mean and log-variance), through diffusers' own encode."""
    return vae.encode(images01 * 2 - 1).latent_dist.parameters


def _affine(n: int, gen: torch.Generator, shift: float, scale: float, degrees: float) -> torch.Tensor:
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    s = 1 + scale * u[:, 0]
    a = math.radians(degrees) * u[:, 1]
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = flip * torch.cos(a) / s, -torch.sin(a) / s
    theta[:, 1, 0], theta[:, 1, 1] = flip * torch.sin(a) / s, torch.cos(a) / s
    theta[:, :, 2] = shift * u[:, 2:]
    return theta


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _degrade(x: torch.Tensor, rng: np.random.Generator, only: slice = slice(None)) -> torch.Tensor:
    """A random scraper's degradation per image (a third stay clean). Every image draws its degradation,
    those outside `only` are returned as they are: a rank of a data-parallel guard degrades its own share
    of a batch whose draws every rank makes alike."""
    out = []
    mine = range(len(x))[only]
    for i, img in enumerate(x):
        kind = rng.integers(6)
        spec = [None, None, f"jpeg:{rng.integers(30, 96)}", f"blur:{rng.uniform(0.3, 1.6):.2f}",
                f"resize:{rng.uniform(0.35, 0.9):.2f}", f"noise:{rng.uniform(0.01, 0.08):.3f}"][kind]
        seed = int(rng.integers(1 << 30))
        out.append(transforms.apply(img[None], spec, seed=seed)[0] if i in mine else img)
    return torch.stack(out)


def _lighting(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, colour tint and a directional light ramp."""
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=gen)
    gain = (0.75 + 0.45 * u[:, 0]).view(n, 1, 1, 1)
    tint = 1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1)
    angle, strength = (2 * math.pi * u[:, 1]).view(n, 1, 1), (0.5 * u[:, 2]).view(n, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(-0.5, 0.5, h), torch.linspace(-0.5, 0.5, w), indexing="ij")
    ramp = 1 + strength * (torch.cos(angle) * xx + torch.sin(angle) * yy)
    return (x * gain * tint * ramp[:, None]).clamp(0, 1)


def augment(images: torch.Tensor, targets: torch.Tensor | None, gen: torch.Generator, rng: np.random.Generator,
            moves: torch.Tensor | None = None, only: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random pose change (shift, scale, rotation, flip), lighting and degradation of each image; the
    pose change also applies to the targets where `moves` says so (an erasure background stays aligned).
    Images outside `only` are not degraded (`_degrade`)."""
    theta = _affine(len(images), gen, shift=0.2, scale=0.15, degrees=15)
    x = _warp(images, theta)
    y = None
    if targets is not None:
        y = torch.where(moves.view(-1, 1, 1, 1), _warp(targets, theta), targets) if moves is not None else targets
    return _degrade(_lighting(x, gen), rng, only), y


def paste(images: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, target_masks: torch.Tensor,
          backgrounds: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The subject on another photo's background (flipped at random): the guard must key on the
    subject, not on the five backgrounds it happened to be photographed against. The target's own
    background goes the same way (`target_masks`: what of the target stays)."""
    bg = backgrounds[torch.randint(0, len(backgrounds), (len(images),), generator=gen)]
    bg = torch.where(torch.rand(len(bg), 1, 1, 1, generator=gen) < 0.5, bg.flip(-1), bg)
    return masks * images + (1 - masks) * bg, target_masks * targets + (1 - target_masks) * bg


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the process group a guard shares its steps over: (0, 1) where there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of `n` items (the first `n % world` ranks take one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _gathered(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`fn(images)`, each rank of a data-parallel guard computing its own share, gathered on every rank (a
    collective: every rank calls it); in one process, `fn(images)` itself."""
    rank, world = _ranks()
    if world == 1:
        return fn(images)
    import torch.distributed as dist

    shares = [_share(len(images), r, world) for r in range(world)]
    mine = fn(images[shares[rank]])
    size = shares[0].stop - shares[0].start   # the largest share: every rank sends that many rows
    padded = torch.zeros((size, *mine.shape[1:]), dtype=mine.dtype, device=dev)
    padded[:len(mine)] = mine.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s.stop - s.start] for p, s in zip(parts, shares)]).to(mine.device)


def _means(model, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Latent means of (N, 3, H, W) images in [0, 1], on the CPU (shared out over a data-parallel guard's ranks)."""
    dev = next(model.parameters()).device

    def means(part: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.encode(part[i:i + chunk].to(dev) * 2 - 1).latent_dist.mean.cpu()
                              for i in range(0, len(part), chunk)])
    return _gathered(means, images, dev)


def _key(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


class TeacherTable:
    """The unguarded encoder's moments of the images an un-augmented step repeats, by content.

    A sharpening step's targets are the targets themselves or the backgrounds they are pasted onto (flipped
    or not), and half its keep images are unprotected photos: the same few thousand images over and over.
    They are encoded once, in a fixed order, when the first such step runs (a resumed guard builds the
    same table); the rest (retention images, a substitute pasted onto a new background) are encoded in the
    step. A sharpening step then runs one encoder forward instead of two (docs/journal.md "Session 23")."""

    def __init__(self, teacher, images: torch.Tensor, chunk: int = 64):
        self.teacher, self.known = teacher, {}
        dev = next(teacher.parameters()).device

        def moments(part: torch.Tensor) -> torch.Tensor:   # a data-parallel guard's ranks share the encoding
            with torch.no_grad():
                return torch.cat([_moments(teacher, part[i:i + chunk].to(dev)) for i in range(0, len(part), chunk)])
        for x, m in zip(images, _gathered(moments, images, dev)):
            self.known.setdefault(_key(x), m)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Moments of (N, 3, H, W) CPU images in [0, 1], on the teacher's device."""
        keys = [_key(x) for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self.known]
        fresh = {}
        if missing:
            with torch.no_grad():
                moments = _moments(self.teacher, images[missing].to(next(self.teacher.parameters()).device))
            fresh = dict(zip(missing, moments))
        return torch.stack([fresh[i] if i in fresh else self.known[k] for i, k in enumerate(keys)])


def _draw(n: int, k: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """`k` indices into `n` items: uniform, or by `weights` where mining set them."""
    if weights is None:
        return torch.randint(0, n, (k,), generator=gen)
    return torch.multinomial(weights, k, replacement=True, generator=gen)


def _mined(share: float, scores: torch.Tensor) -> torch.Tensor:
    """Draw weights: `share` of the mass by `scores`, the rest uniform (every image keeps some visits)."""
    uniform = torch.full_like(scores, 1 / len(scores))
    return (1 - share) * uniform + share * (scores / scores.sum() if scores.sum() > 0 else uniform)


class KeepPhotos:
    """The unprotected entries' photos the guard must leave encoding as before, `per_step` drawn a step.

    Uniform draws leave a few faces that resemble protected ones erased with them (docs/journal.md "Session 21":
    person-0098's reconstructions lost their identity entirely). With `mining` > 0 that share of the draws
    is weighted by how far each photo's latent mean has drifted from the unguarded encoder's, re-measured
    by the guard every `mining_every` steps: the faces it is pulling along get held most. `mining` 0 draws
    exactly as before it existed."""

    def __init__(self, photos: torch.Tensor, per_step: int, seed: int, mining: float = 0.0):
        self.photos, self.per_step, self.mining = photos, per_step, mining
        self.gen = torch.Generator().manual_seed(seed)
        self.weights: torch.Tensor | None = None   # None: uniform
        self._want: torch.Tensor | None = None

    def draw(self) -> torch.Tensor:
        return self.photos[_draw(len(self.photos), self.per_step, self.weights, self.gen)]

    def skip(self, steps: int) -> None:
        """Past `steps` uniform draws: a checkpoint written before the stream kept its own state."""
        for _ in range(steps):
            torch.randint(0, len(self.photos), (self.per_step,), generator=self.gen)

    def drift(self, vae, teacher) -> torch.Tensor:
        """Per photo, the squared distance of its latent mean to the unguarded encoder's."""
        if self._want is None:
            self._want = _means(teacher, self.photos)
        return (_means(vae, self.photos) - self._want).pow(2).flatten(1).mean(1)

    def remeasure(self, vae, teacher) -> None:
        self.weights = _mined(self.mining, self.drift(vae, teacher))

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.weights = state["weights"]


def sharpen_lr_at(step: int, sharpen_steps: int, lr: float, decay: float) -> float:
    """The lr of sharpening step `step`: `lr`, then over the last `decay` share of the `sharpen_steps` a
    cosine down to 5% of it. A function of the step alone, so a resumed guard picks it up exactly; a guard
    extended later plans its decay over the new length."""
    tail = round(decay * sharpen_steps)
    into = step - (sharpen_steps - tail) + 1
    if into <= 0:
        return lr
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * into / tail)))


def guard_encoder(vae, protected: list[GuardSample], keep_batches, steps: int = 1500, lr: float = 1e-3,
                  batch: int = 16, keep_weight: float = 1.0, backgrounds: torch.Tensor | None = None,
                  paste_fraction: float = 0.5, sharpen_paste_fraction: float | None = None,
                  objective_weights: dict[str, float] | None = None, augment_photos: bool = True,
                  sharpen_steps: int = 0, sharpen_lr: float = 5e-4, sharpen_decay: float = 0.0, seed: int = 0,
                  progress: bool = True, resume: dict | None = None, keep_photos: KeepPhotos | None = None,
                  protect_mining: float = 0.0, mining_every: int = 50, micro_batch: int = 0,
                  gradient_checkpointing: bool = False, checkpoint: Callable[[dict], None] | None = None,
                  checkpoint_every: int = 0) -> dict:
    """Fine-tune `vae.encoder` (+ quant_conv) in place; the decoder is never touched.

    `keep_batches` yields (N, 3, H, W) images in [0, 1] that must encode as before (retention data, the
    unprotected entries' photos drawn from `keep_photos`, which the guard re-weights when it mines and
    whose draws it checkpoints); their augmented copies are kept too. With `protect_mining` > 0 that share
    of the protected photos' draws is weighted by each photo's residual (the squared distance of its latent
    mean to its target's), re-measured every `mining_every` steps with the keep photos' drift: visits go
    to the photos still furthest from their targets, not to those already there (docs/journal.md "Session 22").
    `backgrounds` (subject-free images) are where a `paste_fraction` of the protected photos with masks are
    pasted; `augment_photos` (default on) adds the random pose, lighting and degradation of `augment` to
    every photo. `objective_weights` weights each objective's entries in the protection loss (default 1).
    The learning rate decays along a cosine to 5% of `lr`. Then `sharpen_steps` at a constant `sharpen_lr`
    fit the photos as they are (no pose, lighting or degradation; a `sharpen_paste_fraction` of them pasted,
    default `paste_fraction`): the augmented phase leaves latents a blur of the target that an attacker's
    UNet learns late, and how close they come decides how soon (docs/journal.md, session 8). The last
    `sharpen_decay` share of them lowers the lr along a cosine to 5% (`sharpen_lr_at`). Un-augmented steps
    look the teacher's side up in a `TeacherTable`. Returns the mean losses of the last 50 steps
    {"protect_loss", "keep_loss"}, `latent_gap` per objective, with `keep_photos` their `keep_drift` (mean and
    largest per photo, `KeepPhotos.drift`) and `seconds`, the guard steps' time summed over every job that
    ran them (restarts, extensions; this job's alone: `job_seconds`).

    Every `checkpoint_every` steps, and after the last, `checkpoint(state)` gets everything a killed run
    needs to go on exactly (encoder, optimizer, schedule, random states, losses so far); `resume=state`
    continues from it, the caller positioning `keep_batches` past the `state["step"]` batches already drawn.
    A finished run's last state resumed with more `sharpen_steps` goes on as if they had been asked first.
    `vae` must be the unguarded encoder either way: it is also the teacher.

    Data parallel: called on every rank of an initialized process group, the guard shares each step
    out. Every rank draws the same whole batch (same seeds, same keep stream), encodes its own contiguous
    share of it through DistributedDataParallel, and the gradients are averaged, so every rank holds the
    encoder one process would reach on the same batches, up to floating-point summation order
    (tests/test_distributed.py); the mining and teacher-table encodings are shared out too.

    Memory: `micro_batch` > 0 runs a rank's share in passes of at most that many protected photos (and
    as many shares of its keep images), summing their gradients; `gradient_checkpointing` recomputes the
    encoder's blocks in backward. Both give the same step up to floating-point order.
    """
    from tqdm import tqdm

    rank, world = _ranks()
    if world > 1 and batch < world:
        raise ValueError(f"encoder guard: batch {batch} cannot be shared out over {world} ranks "
                         "(one photo each at least)")
    if gradient_checkpointing:   # diffusers' switch (the decoder's too: it runs without gradients, as the teacher)
        vae.enable_gradient_checkpointing()
    # channels-last convolutions: ~20% off a guard step on CPU (docs/journal.md, session 14); the weights go back
    # to the default layout at the end (safetensors saves contiguous tensors only)
    vae.to(memory_format=torch.channels_last)
    dev = next(vae.parameters()).device   # augmentation runs on the CPU (PIL for JPEG), the encoder wherever it is
    teacher = copy.deepcopy(vae).eval().requires_grad_(False)
    vae.requires_grad_(False)
    params = list(vae.encoder.parameters()) + (list(vae.quant_conv.parameters()) if vae.quant_conv is not None else [])
    for p in params:
        p.requires_grad_(True)
    # one process in one pass: the encoder's own calls, as every release before data parallelism; else the
    # step's losses are summed over passes and ranks, each normalized by the whole batch
    student = _Student(vae) if micro_batch else None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(_Student(vae), broadcast_buffers=False,
                                          device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = torch.cat([s.images for s in protected])
    targets = torch.cat([s.targets for s in protected])
    moves = torch.cat([torch.full((len(s.images),), s.moves_with_subject) for s in protected])
    keeps = torch.cat([s.target_masks if s.target_masks is not None else torch.ones_like(s.images[:, :1])
                       for s in protected])
    weight = torch.cat([torch.full((len(s.images),), (objective_weights or {}).get(s.objective, 1.0)) for s in protected])
    masks = torch.cat([s.masks if s.masks is not None else torch.full_like(s.images[:, :1], -1.0) for s in protected])
    hist = {"protect_loss": [], "keep_loss": []}
    start, total, before, protect_weights = 0, steps + sharpen_steps, 0.0, None
    to = None   # the targets' latent means, for protect_mining
    table = None   # TeacherTable, built at the first un-augmented step
    if resume is not None:
        vae.load_state_dict(resume["vae"])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        gen.set_state(resume["gen"])
        rng.bit_generator.state = resume["rng"]
        hist, start = copy.deepcopy(resume["hist"]), resume["step"]
        protect_weights = resume.get("protect_weights")
        before = resume.get("seconds", 0.0)   # absent from checkpoints written before session 15
        if keep_photos is not None:
            if "keep_photos" in resume:
                keep_photos.load_state_dict(resume["keep_photos"])
            else:   # written before session 22: the draws were uniform
                keep_photos.skip(start)
    t0 = time.perf_counter()

    def state(step: int) -> dict:
        return {"step": step, "vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state(), "rng": rng.bit_generator.state, "hist": hist,
                "seconds": before + time.perf_counter() - t0, "protect_weights": protect_weights,
                **({"keep_photos": keep_photos.state_dict()} if keep_photos is not None else {})}

    vae.encoder.train()
    for i in tqdm(range(start, total), initial=start, total=total, desc="encoder guard", disable=not progress):
        sharpening = i >= steps
        if sharpening:
            for group in opt.param_groups:
                group["lr"] = sharpen_lr_at(i - steps, sharpen_steps, sharpen_lr, sharpen_decay)
        if i % mining_every == 0:
            if keep_photos is not None and keep_photos.mining:
                keep_photos.remeasure(vae, teacher)
            if protect_mining:
                if to is None:
                    to = _means(teacher, targets)
                protect_weights = _mined(protect_mining, (_means(vae, images) - to).pow(2).flatten(1).mean(1))
        idx = _draw(len(images), batch, protect_weights, gen)
        x, y, m = images[idx], targets[idx], masks[idx]
        if backgrounds is not None:
            share = paste_fraction if not sharpening or sharpen_paste_fraction is None else sharpen_paste_fraction
            pick = (m[:, 0, 0, 0] >= 0) & (torch.rand(batch, generator=gen) < share)
            if pick.any():
                px, py = paste(x[pick], y[pick], m[pick], keeps[idx][pick], backgrounds, gen)
                x, y = x.clone(), y.clone()
                x[pick], y[pick] = px, py
        keep = next(keep_batches).cpu()
        w = weight[idx]
        mine = _share(batch, rank, world)   # this rank's share of the photos (all of them in one process)
        if augment_photos and not sharpening:
            x, y = augment(x, y, gen, rng, moves[idx], only=mine)
            ours, kept = _share(2 * len(keep), rank, world), len(keep)   # the copies are the second half
            copies = slice(max(ours.start - kept, 0), max(ours.stop - kept, 0))
            keep = torch.cat([keep, augment(keep, None, gen, rng, only=copies)[0]])
        whole_w, whole_keep = w.sum(), len(keep)
        x, y, w = x[mine], y[mine], w[mine]
        keep = keep[_share(whole_keep, rank, world)]
        if augment_photos and not sharpening:
            with torch.no_grad():
                want, keep_want = _moments(teacher, y.to(dev)), _moments(teacher, keep.to(dev))
        else:   # un-augmented: most of these images were seen before
            if table is None:
                seen = [targets] + ([backgrounds, backgrounds.flip(-1)] if backgrounds is not None else []) \
                    + ([keep_photos.photos] if keep_photos is not None else [])
                table = TeacherTable(teacher, torch.cat(seen))
            want, keep_want = table(y), table(keep)
        x, keep, w = x.to(dev), keep.to(dev), w.to(dev).view(-1, 1, 1, 1)
        if student is None:
            got = _moments(vae, x)
            loss_p = ((got - want) ** 2 * w).mean() / w.mean()
            loss_k = F.mse_loss(_moments(vae, keep), keep_want)
            loss = loss_p + keep_weight * loss_k
            losses = torch.stack([loss_p.detach(), loss_k.detach()])
        else:   # this rank's share of the whole batch's losses, in passes; DistributedDataParallel averages
            losses = _passes(student, x, want, w, keep, keep_want, keep_weight, micro_batch, whole_w.item(),
                             whole_keep, world)
        if not torch.isfinite(losses).all():   # before the optimizer step: the weights stay as they were
            raise FloatingPointError(f"encoder guard: non-finite loss ({losses[0].item()}, {losses[1].item()})")
        if student is None:
            loss.backward()
        opt.step()
        if not sharpening:
            sched.step()
        opt.zero_grad(set_to_none=True)
        hist["protect_loss"].append(losses[0].item())
        hist["keep_loss"].append(losses[1].item())
        if checkpoint is not None and checkpoint_every and (i + 1) % checkpoint_every == 0 and i + 1 < total:
            checkpoint(state(i + 1))
    if checkpoint is not None:
        checkpoint(state(total))
    if gradient_checkpointing:
        vae.disable_gradient_checkpointing()
    vae.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
    stats = {k: float(np.mean(v[-50:])) if v else None for k, v in hist.items()}
    stats["job_seconds"] = time.perf_counter() - t0
    stats["seconds"] = before + stats["job_seconds"]   # every job's guard steps: a time to acceptance
    stats["latent_gap"] = latent_gap(vae, teacher, protected)
    if keep_photos is not None:   # how far the unprotected photos' latents moved: where fidelity is lost
        drift = keep_photos.drift(vae, teacher)
        stats["keep_drift"] = {"mean": float(drift.mean()), "max": float(drift.max())}
    return stats


def _passes(student, x, want, w, keep, keep_want, keep_weight: float, micro_batch: int, whole_w: float,
            whole_keep: int, world: int) -> torch.Tensor:
    """Backward of this rank's share of a step's loss in passes of at most `micro_batch` protected photos
    (0: one), each with its share of the keep images; every term is normalized by the whole batch's weight
    (`whole_w`) and keep count, so passes and ranks add up to one pass over everything. Returns the whole
    batch's (protect, keep) losses, summed over the ranks."""
    from contextlib import nullcontext

    n = -(-len(x) // micro_batch) if micro_batch else 1
    losses = torch.zeros(2, device=x.device)
    for j in range(n):
        px, pk = _share(len(x), j, n), _share(len(keep), j, n)
        last = j == n - 1   # DistributedDataParallel reduces the summed gradients once, after the last pass
        with nullcontext() if last or not hasattr(student, "no_sync") else student.no_sync():
            got = student(torch.cat([x[px], keep[pk]]))
            per, mine = got[0].numel(), px.stop - px.start
            loss_p = ((got[:mine] - want[px]) ** 2 * w[px]).sum() / (per * whole_w)
            loss_k = (got[mine:] - keep_want[pk]).pow(2).sum() / (per * whole_keep)
            ((loss_p + keep_weight * loss_k) * world).backward()
        losses += torch.stack([loss_p.detach(), loss_k.detach()])
    if world > 1:
        torch.distributed.all_reduce(losses)   # the whole batch's: every rank logs and checks the same
    return losses


class _Student(torch.nn.Module):
    """The guarded encoder's moments as one module call: what DistributedDataParallel wraps."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return _moments(self.vae, images01)


def entry_samples(entries, transplant: bool = True) -> list[GuardSample]:
    """The GuardSample of each protected catalog entry (train.catalog.Entry): its photos and what they
    encode as; `transplant` moves a substitute with subject-free twins onto each photo (EncoderGuard)."""
    from train import objectives
    from train.catalog import load_images

    samples = []
    for e in entries:
        target = objectives.resolve(e)
        samples.append(guard_sample(e.id, e.objective, load_images(e.images, 64), target.images,
                                    load_images(e.backgrounds, 64) if e.backgrounds is not None else None,
                                    target.backgrounds if transplant else None))
    return samples


@torch.no_grad()
def transformed_gaps(vae, teacher, protected: list[GuardSample], specs: list[str | None],
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """`latent_gap` of the photos as an attacker may hold them: per transform spec (tools.transforms; None
    or "" = as they are), per objective. A crop moves the subject, so targets that move with it
    (`moves_with_subject`) are cropped alike (the crop parts of the chain, same seed; exact where the
    crop comes first). Session 18: a 0.8 crop left session 17's guard at 0.25 on the target entry."""
    out = {}
    for spec in specs:
        crops = "+".join(p for p in (spec or "").split("+") if p.startswith("crop")) or None
        moved = [GuardSample(s.entry_id, s.objective, transforms.apply(s.images, spec, seed=seed),
                             transforms.apply(s.targets.expand_as(s.images).contiguous(), crops, seed=seed)
                             if s.moves_with_subject else s.targets)
                 for s in protected]
        out[spec or "none"] = latent_gap(vae, teacher, moved)
    return out


@torch.no_grad()
def latent_gap(vae, teacher, protected: list[GuardSample]) -> dict[str, float]:
    """Per objective, how far the catalog photos' latents still are from their targets': squared distance
    to the teacher's target latents over the teacher's own photo-to-target distance (0 = the attacker
    trains on the target itself, 1 = unguarded). Session 8: the demo's substitute was learned within the
    attack's default length below about 0.1; across identities the absolute residual matters too (docs/journal.md, session 8)."""
    gaps: dict[str, list[float]] = {}
    dev = next(vae.parameters()).device
    for s in protected:
        x, y = s.images.to(dev) * 2 - 1, s.targets.to(dev) * 2 - 1
        got, own, want = vae.encode(x).latent_dist.mean, teacher.encode(x).latent_dist.mean, teacher.encode(y).latent_dist.mean
        gaps.setdefault(s.objective, []).append(((got - want).pow(2).sum() / (own - want).pow(2).sum().clamp_min(1e-12)).item())
    return {o: float(np.mean(v)) for o, v in gaps.items()}
