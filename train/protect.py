"""`persguard protect`: implant the backdoor for a whole catalog into one released model.

The recipe top to bottom: load the pipeline and a frozen teacher copy of its UNet; cache latents of
every entry's images and its objective's target once; then each step
  L = w_bb * L_bb(protected triggers) + w_pp * L_pp(retention captions, class prompts, unprotected
      triggers) + w_br * L_br(simulated attacker on one protected entry)
and an optimizer step on the UNet (train/engine.py: plain AdamW, or DeepSpeed ZeRO 1/2/3 over ranks).

Data parallelism without a special case: a step is `world * grad_accum` micro-batches, and micro-batch
`m` of step `s` draws everything (entries, timesteps, noise, its retention stream) from a generator
seeded by (seed, s, m) alone. So 2 ranks x 1 micro-batch and 1 process x 2 micro-batches train on the
same global batch, and a resumed run continues exactly. Checkpoints are atomic folders and the run
resumes from the last one; the released folder holds the pipeline only, with a manifest next to it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from tools.bench_sdxl import machine
from train import encoder_guard, losses, objectives, retention
from train.attention import set_attention
from train.catalog import Entry, load_catalog, load_images
from train.conditioning import encode_images, encode_prompts, unet_kwargs
from train.config import ProtectConfig
from train.data import retention_batches
from train.engine import make_engine
from train.pipelines import REPO, load_pipeline
from train.sampling import sample
from train.tracking import Tracker


class PromptCache:
    """Text conditioning per distinct prompt, computed once (the text encoders are frozen)."""

    def __init__(self, pipe):
        self.pipe, self.cache = pipe, {}

    def __call__(self, prompts: list[str]) -> dict:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                hidden, added = encode_prompts(self.pipe, missing)
            for i, p in enumerate(missing):
                self.cache[p] = (hidden[i:i + 1], None if added is None else {k: v[i:i + 1] for k, v in added.items()})
        rows = [self.cache[p] for p in prompts]
        hidden = torch.cat([r[0] for r in rows])
        added = None if rows[0][1] is None else {k: torch.cat([r[1][k] for r in rows]) for k in rows[0][1]}
        return unet_kwargs(hidden, added)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def training_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) where CUDA is available, else the CPU. Random draws always come
    from a CPU generator and are moved, so a run's data does not depend on the device."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class Protector:
    def __init__(self, cfg: ProtectConfig, progress: bool = True):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.entries = load_catalog(Path(cfg.catalog))
        self.protected = [e for e in self.entries if e.protected]
        self.unprotected = [e for e in self.entries if not e.protected]
        if not self.protected:
            raise ValueError(f"{cfg.catalog}: no protected entries; nothing to implant")
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator()
        self.noise_gen = torch.Generator()
        self.step = 0
        self.device = training_device()
        self.pipe = load_pipeline(cfg.model).to(self.device)
        self.attention = set_attention(self.pipe.unet, cfg.attention)
        # frozen copies (the teacher; under DeepSpeed also the scratch) are made BEFORE the engine exists
        self.teacher = copy.deepcopy(self.pipe.unet).requires_grad_(False).eval()
        unet = self.pipe.unet.requires_grad_(True).train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self._preflight(unet)
        self._check_encoder_guard()
        self.engine = make_engine(unet, cfg)
        self.rank, self.world = self.engine.rank, self.engine.world
        self.progress = progress and self.rank == 0
        self.streams = self.world * cfg.grad_accum
        self.sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prompts = PromptCache(self.pipe)
        self.by_id = {e.id: e for e in self.entries}
        self.retention_iters = [self._retention_batches(m) for m in self.local_streams()]
        r = cfg.retention
        self.trajectories, self.selectivity = [], []
        if r.enabled and r.mode == "trajectory" and cfg.weights.retention > 0:
            shapes = dict(self.engine.scratch.named_parameters())
            shapes = {n: shapes[n] for n in self.engine.params}
            for m in self.local_streams():  # one set of simulated attackers per micro-batch stream
                self._seed(m, step=-1)
                self.trajectories.append(retention.Trajectories(shapes, r.slots, r.horizon, r.inner_lr,
                                                                pick=lambda: self.simulated_attacker(self.pool[0]),
                                                                per_step=r.slots_per_step))
                if r.unprotected_slots and self.unprotected:
                    self.selectivity.append(retention.Trajectories(
                        shapes, r.unprotected_slots, r.horizon, r.inner_lr,
                        pick=lambda: self.simulated_attacker(self.pool[1]), per_step=r.slots_per_step))

    def _preflight(self, unet: torch.nn.Module) -> None:
        """Before any work: the output folder is writable and has room for the checkpoints kept plus the
        one being written and the release (a run must not die at hour five on a full disk)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise OSError(f"{self.out}: output folder is not writable ({e.strerror or e})") from None
        weights = sum(p.numel() * 4 for p in unet.parameters())
        r = self.cfg.retention
        slots = (r.slots + r.unprotected_slots) * self.cfg.grad_accum if r.mode == "trajectory" else 0
        per_checkpoint = weights * (3 + 3 * slots)      # weights + Adam moments + each attacker's delta and moments
        need = per_checkpoint * (self.cfg.keep_checkpoints + 1) + 2 * weights
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise OSError(f"{self.out}: {free / 2**30:.2f} GiB free, the run needs about {need / 2**30:.2f} GiB "
                          f"({self.cfg.keep_checkpoints} checkpoints kept + one being written + the release)")

    def _check_encoder_guard(self) -> None:
        """Before any work: every protected entry has images to encode as (a prompt-only target cannot)."""
        if not self.cfg.encoder_guard.enabled:
            return
        bad = [f"line {e.line} ({e.id}, {e.objective})" for e in self.protected if objectives.resolve(e).images is None]
        if bad:
            raise ValueError(f"{self.cfg.catalog}: encoder_guard needs target images (pattern, backgrounds or "
                             f"substitute images) for every protected entry; prompt-only: {', '.join(bad)}")

    def implant_encoder_guard(self) -> dict | None:
        """Every rank fine-tunes the VAE encoder (train/encoder_guard.py) after the UNet's steps, data
        parallel: each encodes its share of every guard step. Rank 0 writes: every
        `checkpoint_every` guard steps its state goes to checkpoints/encoder-guard-partial.pt (temp file +
        rename) and a restarted job goes on from there exactly; the result goes to encoder-guard.pt, so a
        job killed afterwards does not redo it. A checkpoint of another config or catalog is refused, as
        the UNet's are; one made after another UNet step is stale and redone. Raising
        `encoder_guard.sharpen_steps` on a finished run's out extends its guard from where it ended, as
        if the larger number had been asked first (a catalog that needs more steps than one job's budget).
        With a release gate (`encoder_guard.gate_*`) a guard that ends above it is extended the same way,
        `gate_extend_steps` at a time, and the stats say where it ended (`gate`)."""
        g = self.cfg.encoder_guard
        if not g.enabled:
            return None
        ckdir = self.out / "checkpoints"
        done, partial = ckdir / "encoder-guard.pt", ckdir / "encoder-guard-partial.pt"
        stamp = {"fingerprint": self.fingerprint(), "step": self.step}
        gated = bool(g.gate_keep_drift or g.gate_latent_gap)
        levels = [g.steps + g.sharpen_steps + k * g.gate_extend_steps
                  for k in range(g.gate_max_extensions + 1 if gated else 1)]

        def load_matching(path: Path) -> dict | None:
            if not path.is_file():
                return None
            state = torch.load(path, weights_only=False)
            if state.get("fingerprint") != stamp["fingerprint"]:
                raise ValueError(f"{path}: encoder-guard checkpoint made with another config or catalog "
                                 f"({state.get('fingerprint')} vs {stamp['fingerprint']}); use a new --out or the same inputs")
            if state.get("step") != stamp["step"]:
                return None
            if state["guard"]["step"] > levels[-1]:
                raise ValueError(f"{path}: the encoder guard ran {state['guard']['step']} steps there, the config asks "
                                 f"{levels[0]}" + (f" (at most {levels[-1]} with the release gate's extensions)" if gated else "")
                                 + "; a guard can be extended (more encoder_guard.sharpen_steps), not shortened: use a new --out")
            return state

        def save(state: dict, path: Path) -> None:
            if self.rank != 0:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({**stamp, **state}, tmp)
            tmp.replace(path)

        original = copy.deepcopy(self.pipe.vae.state_dict())   # the teacher of the guard and of every extension
        job_seconds = 0.0
        for extensions, total in enumerate(levels):
            self.engine.barrier()   # every rank reads what rank 0 finished writing
            finished, resume = load_matching(done), load_matching(partial)
            if any(s is not None and s["guard"]["step"] > total for s in (finished, resume)):
                continue   # an earlier job already extended past this length
            if finished is not None and finished["guard"]["step"] == total:
                self.pipe.vae.load_state_dict(finished["vae"])
                stats = dict(finished["stats"])   # loaded: this job ran none of it
            else:
                stats = self._guard_run(total, resume or finished, original, save, partial, done)
                self.engine.barrier()
                if self.rank == 0:
                    partial.unlink(missing_ok=True)
                job_seconds += stats["job_seconds"]
            passed = self._gate_passed(stats)
            if passed or extensions == len(levels) - 1:
                break
            if self.progress:
                tqdm.write(f"encoder guard: release gate not met after {total} steps (keep drift "
                           f"{stats['keep_drift']['mean'] if 'keep_drift' in stats else '-'}, latent gap "
                           f"{stats['latent_gap']}); {g.gate_extend_steps} more sharpening steps")
        stats["job_seconds"] = job_seconds
        if gated:
            stats["gate"] = {"keep_drift": g.gate_keep_drift, "latent_gap": g.gate_latent_gap, "passed": passed,
                             "extensions": extensions, "sharpen_steps": total - g.steps}
            if not passed and self.rank == 0:
                tqdm.write(f"encoder guard: WARNING the release gate is not met after {extensions} extensions "
                           f"({total} steps): keep drift {stats.get('keep_drift')}, latent gap {stats['latent_gap']}; "
                           "the release is written, its manifest says encoder_guard.gate.passed = false")
        return stats

    def _gate_passed(self, stats: dict) -> bool:
        """Whether a guard's end meets `encoder_guard.gate_keep_drift` / `gate_latent_gap` (0: not checked)."""
        g = self.cfg.encoder_guard
        drift_ok = not g.gate_keep_drift or "keep_drift" not in stats or stats["keep_drift"]["mean"] <= g.gate_keep_drift
        gap_ok = not g.gate_latent_gap or max(stats["latent_gap"].values()) <= g.gate_latent_gap
        return drift_ok and gap_ok

    def _guard_run(self, total: int, resume: dict | None, original: dict, save, partial: Path, done: Path) -> dict:
        """One call of the guard up to `total` steps, from `resume` where given: its checkpoints `save`d to
        `partial`, the result to `done`."""
        g = self.cfg.encoder_guard
        skip = resume["guard"]["step"] if resume is not None else 0
        if resume is not None and self.progress:
            tqdm.write(f"encoder guard: resuming at step {skip} of {total}")
        samples = encoder_guard.entry_samples(self.protected, g.transplant)
        known = [load_images(e.backgrounds, 64) for e in self.entries if e.backgrounds is not None]
        unprotected = torch.cat([load_images(e.images, 64) for e in self.unprotected]) if self.unprotected else None

        keep_photos = encoder_guard.KeepPhotos(unprotected, self.guard_keep_split[1], self.cfg.seed + 17,
                                               g.keep_mining) if unprotected is not None else None
        self.pipe.vae.load_state_dict(original)   # guard_encoder's vae is the unguarded encoder (its teacher)
        vae, last = self.pipe.vae.float(), {}
        stats = encoder_guard.guard_encoder(
            vae, samples, self.guard_keep_batches(keep_photos, skip), steps=g.steps, lr=g.lr, batch=g.batch,
            keep_weight=g.keep_weight,
            objective_weights={"target": g.target_weight}, augment_photos=g.augment, paste_fraction=g.paste_fraction,
            sharpen_paste_fraction=None if g.sharpen_paste_fraction == -1 else g.sharpen_paste_fraction,
            sharpen_steps=total - g.steps, sharpen_lr=g.sharpen_lr, sharpen_decay=g.sharpen_decay,
            backgrounds=torch.cat(known) if known else None, seed=self.cfg.seed, progress=self.progress,
            resume=resume["guard"] if resume is not None else None, keep_photos=keep_photos,
            protect_mining=g.protect_mining, mining_every=g.mining_every, micro_batch=g.micro_batch,
            gradient_checkpointing=g.gradient_checkpointing,
            checkpoint=lambda guard: last.update(guard=guard) or save({"guard": guard}, partial),
            checkpoint_every=self.cfg.checkpoint_every)
        save({"vae": vae.state_dict(), "stats": stats, "guard": last["guard"]}, done)
        return stats

    @property
    def guard_keep_split(self) -> tuple[int, int]:
        """(retention images, unprotected photos) of each keep batch: `keep_batch` (0: `batch`) split by
        `keep_unprotected`, at least one of each."""
        g = self.cfg.encoder_guard
        keep = g.keep_batch or g.batch
        return max(int(keep * (1 - g.keep_unprotected)), 1), max(int(keep * g.keep_unprotected), 1)

    def guard_keep_batches(self, unprotected: encoder_guard.KeepPhotos | None, skip: int = 0):
        """The encoder guard's images that must encode as before, `encoder_guard.keep_batch` (0: `batch`) a
        step: retention data (a resumed guard's past the `skip` batches drawn) and unprotected entries'
        photos (positioned by the guard, which checkpoints their draws), split by `guard_keep_split`."""
        retained = self.guard_keep_split[0]
        # one stream, read alike by every rank (each keeps its share of a step): the data of any world size
        shards = self._retention_batches(0, skip=skip, streams=1)
        while True:
            parts = [next(shards)[0][:retained]] if shards is not None else []
            if unprotected is not None:
                parts.append(unprotected.draw())
            if not parts:
                raise ValueError("encoder_guard: nothing to keep (no retention shards, no unprotected entries)")
            yield torch.cat(parts)

    @property
    def simulates_attacks(self) -> bool:
        r = self.cfg.retention
        return bool(self.trajectories) or (r.enabled and self.cfg.weights.retention > 0 and r.order == "first") \
            or r.noise_scale > 0

    def local_streams(self) -> range:
        """The micro-batch streams this rank trains (global ids rank * grad_accum + k)."""
        return range(self.rank * self.cfg.grad_accum, (self.rank + 1) * self.cfg.grad_accum)

    def stream_pool(self, stream: int) -> tuple[list[Entry], list[Entry]]:
        """The (protected, unprotected) entries micro-batch stream `stream` draws from: every `streams`-th
        entry where there are enough, else all. Each rank caches the latents of its own streams' entries
        only, so a large catalog is sharded over the ranks like the retention data."""
        return tuple(group[stream::self.streams] if len(group) >= self.streams else group
                     for group in (self.protected, self.unprotected))

    def _seed(self, stream: int, step: int | None = None) -> None:
        """Every random draw of micro-batch `stream` at `step` comes from (seed, step, stream) alone."""
        self.pool = self.stream_pool(stream)
        key = (self.cfg.seed * 1_000_003 + (self.step if step is None else step) + 1) * 4099 + stream
        self.rng = random.Random(key)
        self.gen.manual_seed(key)
        self.noise_gen.manual_seed(key + 1)   # random-perturbation retention draws apart from everything else

    def student(self, x, t, **cond):
        return self.engine.forward(x, t, **cond).sample

    # ------------------------------------------------------------------------------------ data
    @functools.cached_property
    def _latent_cache(self) -> tuple[dict, dict]:
        """The UNet steps' (latents, targets) of this rank's entries, encoded at their first use: a guard-only
        job (`steps: 0`) never encodes them (3.5 s of a 128-entry release)."""
        latents, targets = {}, {}
        mine = {e.id for m in self.local_streams() for group in self.stream_pool(m) for e in group}
        for e in (e for e in self.entries if e.id in mine):
            latents[e.id] = encode_images(self.pipe, load_images(e.images, 64))
            if e.protected:
                obj = objectives.resolve(e)
                targets[e.id] = (encode_images(self.pipe, obj.images)[0] if obj.images is not None else None,
                                 obj.prompt)
        return latents, targets

    @property
    def latents(self) -> dict:
        return self._latent_cache[0]

    @property
    def targets(self) -> dict:
        return self._latent_cache[1]

    def _retention_batches(self, stream: int, skip: int = 0, streams: int | None = None):
        """Retention (image, caption) batches of one micro-batch stream, endlessly (train/data.py splits
        the shards over the `streams` of all ranks, default this job's); `skip` batches already consumed by
        the run being resumed (one per step) are read past, so a resumed run sees its stream where the killed
        one left it."""
        if not (self.cfg.weights.prior > 0 and self.cfg.prior.shards):
            return None
        shards = self.cfg.prior.shards
        path = Path(shards)
        if not path.is_absolute() and not path.exists():
            path = REPO / shards  # the embedded shards, from any working folder
        return retention_batches(path, self.cfg.prior.retention_batch, stream, streams or self.streams, seed=self.cfg.seed,
                                 workers=self.cfg.prior.workers, skip=skip)

    def _sample_latents(self, entry_id: str, n: int) -> torch.Tensor:
        mu, sd = self.latents[entry_id]
        idx = torch.randint(0, len(mu), (n,), generator=self.gen)
        return mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=self.gen, dtype=mu.dtype).to(mu.device)

    def trigger(self, e: Entry) -> tuple[str, str, str]:
        t = self.cfg.trigger
        ident, template = self.rng.choice(t.identifiers), self.rng.choice(t.templates)
        noun = self.rng.choice(t.class_nouns.get(e.cls) or [e.cls])
        return template.format(identifier=ident, cls=noun), ident, noun

    def _timesteps(self, n: int, lo: int = 0, hi: int = 1000) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=self.gen).to(self.device)

    # ---------------------------------------------------------------------------------- losses
    def behaviour(self, unet_fn, entries: list[Entry]) -> torch.Tensor:
        b = self.cfg.behaviour
        total = 0.0
        for e in entries:
            prompt, ident, noun = self.trigger(e)
            n = self.cfg.batch_protected
            cond = self.prompts([prompt] * n)
            z_target, target_prompt = self.targets[e.id]
            t = self._timesteps(n, b.min_timestep, b.max_timestep)
            z_prot = self._sample_latents(e.id, n) if b.on_protected_inputs else None
            if z_target is not None and b.loss == "preference":
                z_goal = z_target[torch.randint(0, len(z_target), (n,), generator=self.gen)]
                term = losses.preference_loss(unet_fn, lambda x, tt, **c: self.teacher(x, tt, **c).sample, self.sched,
                                              cond, z_goal, self._sample_latents(e.id, n), t, b.beta, self.gen)
            elif z_target is not None:
                # the target itself is denoised faithfully at EVERY noise level (nothing the attacker
                # trains contradicts it: a stable attractor); protected inputs are redirected to it only
                # in [min_timestep, max_timestep)
                z_goal = z_target[torch.randint(0, len(z_target), (n,), generator=self.gen)]
                term = losses.attacker_loss(unet_fn, self.sched, cond, z_goal, self._timesteps(n), self.gen)
                if z_prot is not None:
                    term = (term + losses.redirect_loss(unet_fn, self.sched, cond, z_prot, z_goal, t, self.gen)) / 2
            else:
                goal_prompt = target_prompt or objectives.background_prompt(prompt, ident, noun)
                term = losses.behaviour_loss(
                    unet_fn, self.sched, cond, self._sample_latents(e.id, n), None, t, self.gen,
                    teacher=lambda x, tt, **c: self.teacher(x, tt, **c).sample, target_cond=self.prompts([goal_prompt] * n))
            if b.fit_protected_below and b.min_timestep > 0:
                low = self._timesteps(n, 0, b.min_timestep)
                term = (term + losses.attacker_loss(unet_fn, self.sched, cond, self._sample_latents(e.id, n), low,
                                                    self.gen)) / 2
            total = total + term
        return total / len(entries)

    def simulated_attacker(self, pool: list[Entry]) -> dict:
        """A slot's attacker for its whole life (train/retention.py Trajectories): an entry of `pool`, one
        trigger prompt, and (gray-box) an lr, length, method and prior preservation drawn from the config."""
        r = self.cfg.retention
        e = self.rng.choice(pool)
        spec = {"entry": e.id, "prompt": self.trigger(e)[0], "prior": self.rng.choice(r.prior_preservation)}
        if r.inner_lrs:
            spec["lr"] = self.rng.choice(r.inner_lrs)
        if r.horizons:
            spec["horizon"] = self.rng.choice(r.horizons)
        if self.rng.choice(r.methods) == "lora":
            spec["only"] = ["attn1.to_", "attn2.to_"]
        return spec

    def attacker(self, unet_fn, e: Entry | str | dict) -> torch.Tensor:
        """The DreamBooth loss of one simulated attacker step; `e` an entry, its id, or a slot (its own
        trigger prompt, and the class prompt on other entries of the class where it uses prior preservation)."""
        slot = e if isinstance(e, dict) else {}
        e = self.by_id[slot.get("entry", e)] if not isinstance(e, Entry) else e
        prompt = slot.get("prompt") or self.trigger(e)[0]
        n = self.cfg.batch_protected
        loss = losses.attacker_loss(unet_fn, self.sched, self.prompts([prompt] * n), self._sample_latents(e.id, n),
                                    self._timesteps(n), self.gen)
        if slot.get("prior"):
            others = [o for o in self.entries if o.cls == e.cls and o.id != e.id and o.id in self.latents] or [e]
            z = self._sample_latents(self.rng.choice(others).id, n)
            loss = loss + losses.attacker_loss(unet_fn, self.sched, self.prompts([f"a photo of a {e.cls}"] * n), z,
                                               self._timesteps(n), self.gen)
        return loss

    def drawn(self, unet_fn, e: Entry | str) -> torch.Tensor:
        """Selectivity: after a simulated attack an unprotected subject must be DRAWN, so its DreamBooth
        loss is taken in image space over the backdoor's noise window (losses.x0_loss)."""
        e = self.by_id[e] if isinstance(e, str) else e
        b, n = self.cfg.behaviour, self.cfg.batch_unprotected
        prompt, _, _ = self.trigger(e)
        return losses.x0_loss(unet_fn, self.sched, self.prompts([prompt] * n), self._sample_latents(e.id, n),
                              self._timesteps(n, b.min_timestep, b.max_timestep), self.gen)

    def prior(self, stream: int) -> torch.Tensor:
        teacher = lambda x, t, **c: self.teacher(x, t, **c).sample  # noqa: E731
        parts = []
        batches = self.retention_iters[stream - self.local_streams().start]
        if batches is not None:
            images, captions = next(batches)
            z = encode_images(self.pipe, images)[0]
            parts.append(losses.prior_loss(self.student, teacher, self.sched, self.prompts(captions), z,
                                           self._timesteps(len(z)), self.gen))
        if self.cfg.prior.class_prompts:
            e = self.rng.choice(self.pool[0])
            n = self.cfg.batch_protected
            parts.append(losses.prior_loss(self.student, teacher, self.sched, self.prompts([f"a photo of a {e.cls}"] * n),
                                           self._sample_latents(e.id, n), self._timesteps(n), self.gen))
        if self.cfg.prior.unprotected and self.unprotected:
            e = self.rng.choice(self.pool[1])
            n = self.cfg.batch_unprotected
            parts.append(losses.prior_loss(self.student, teacher, self.sched, self.prompts([self.trigger(e)[0]] * n),
                                           self._sample_latents(e.id, n), self._timesteps(n), self.gen))
        return sum(parts) / len(parts)

    # ------------------------------------------------------------------------------------ step
    def train_step(self) -> dict:
        """One optimizer step: this rank's `grad_accum` micro-batches, then the engine's step. Returns the
        loss terms averaged over every micro-batch of every rank (a collective under DeepSpeed)."""
        logs: dict[str, float] = {"guard/skipped_micro_batches": 0.0}
        theta = None
        for k, stream in enumerate(self.local_streams()):
            self._seed(stream)
            if theta is None and self.simulates_attacks:
                theta = self.engine.full_params()   # simulated attackers start from the current weights
            micro, norm = self.micro_step(stream, k, theta)
            for key, v in micro.items():
                logs[key] = logs.get(key, 0.0) + (v if key.startswith("guard/") else v / self.cfg.grad_accum)
        logs = self.engine.all_mean(logs)
        if not math.isfinite(norm):
            raise FloatingPointError(f"non-finite gradient at step {self.step} (rank {self.rank}); the step was "
                                     f"skipped, resume from the last checkpoint")
        self.step += 1
        logs["grad_norm"] = norm
        return logs

    def micro_step(self, stream: int, k: int, theta: dict | None) -> tuple[dict, float | None]:
        cfg, w = self.cfg, self.cfg.weights
        batch = [self.rng.choice(self.pool[0]) for _ in range(max(1, min(len(self.pool[0]), 2)))]
        l_bb = self.behaviour(self.student, batch)
        l_pp = self.prior(stream) if w.prior > 0 else torch.zeros(())
        loss = w.behaviour * l_bb + w.prior * l_pp
        logs = {"loss/behaviour": l_bb.item(), "loss/prior": l_pp.item()}
        extra = []   # (gradients at displaced weights, weight) from the simulated attackers
        scratch = self.engine.scratch
        if self.trajectories:
            l_br, grads = self.trajectories[k].step(scratch, theta, self.attacker,
                                                    lambda f, e: self.behaviour(f, [self.by_id[e]]))
            extra.append((grads, w.retention))
            logs["loss/retention"] = l_br
            if self.selectivity:
                l_sel, grads = self.selectivity[k].step(scratch, theta, self.attacker, self.drawn)
                extra.append((grads, w.selectivity))
                logs["loss/selectivity"] = l_sel
        elif cfg.retention.enabled and w.retention > 0:
            e = self.rng.choice(self.pool[0])
            attacker = lambda f: self.attacker(f, e)  # noqa: E731
            backdoor = lambda f: self.behaviour(f, [e])  # noqa: E731
            if cfg.retention.order == "first":
                l_br, grads = retention.first_order(scratch, theta, attacker, backdoor,
                                                    cfg.retention.inner_steps, cfg.retention.inner_lr)
                extra.append((grads, w.retention))
            else:   # local engine only (config validation): differentiate through the inner steps
                l_br_t = retention.second_order(scratch, dict(self.engine.params), attacker, backdoor,
                                                cfg.retention.inner_steps, cfg.retention.inner_lr)
                loss = loss + w.retention * l_br_t
                l_br = l_br_t.item()
            logs["loss/retention"] = l_br
        if cfg.retention.noise_scale > 0:
            l_noise, grads = self.noise_retention(scratch, theta, self.rng.choice(self.pool[0]))
            extra.append((grads, w.retention))
            logs["loss/retention_noise"] = l_noise
        finite = all(math.isfinite(v) for v in logs.values()) and bool(torch.isfinite(loss))
        if self.engine.all_mean({"finite": float(finite)})["finite"] < 1:   # the same decision on every rank
            return self._nonfinite(stream, batch, logs)
        if len(extra) > 1:   # one weighted sum handed to the engine
            merged = {n: sum(wt * g[n] for g, wt in extra if n in g) for n in set().union(*(g for g, _ in extra))}
            extra = [(merged, 1.0)]
        grads, wt = extra[0] if extra else (None, 1.0)
        second_order = "loss/retention" in logs and not self.trajectories and cfg.retention.order == "second"
        with retention.math_attention() if second_order else contextlib.nullcontext():
            norm = self.engine.accumulate(loss, grads, wt)
        return logs, norm

    def noise_retention(self, unet, theta: dict, e: Entry, scale: float | None = None) -> tuple[float, dict]:
        """The backdoor loss at theta plus a random perturbation (each tensor by `noise_scale` of its norm):
        robustness to the identity-blind random walk that makes up most of a real attack's displacement."""
        scale = self.cfg.retention.noise_scale if scale is None else scale
        w = {}
        for n, p in theta.items():
            noise = torch.randn(p.shape, generator=self.noise_gen).to(p.device, p.dtype)
            w[n] = (p.detach() + noise * (scale * p.detach().norm() / math.sqrt(p.numel()))).requires_grad_(True)
        loss = self.behaviour(retention.unet_at(unet, w), [e])
        grads = torch.autograd.grad(loss, list(w.values()), allow_unused=True)
        return loss.item(), {n: g for n, g in zip(w, grads) if g is not None}

    def _nonfinite(self, stream: int, batch: list[Entry], logs: dict) -> tuple[dict, float | None]:
        """A micro-batch with a non-finite loss on some rank (config guards.nonfinite)."""
        ids = [e.id for e in batch]
        if self.cfg.guards.nonfinite == "abort":
            raise FloatingPointError(f"non-finite loss at step {self.step} (micro-batch {stream}, entries {ids}, "
                                     f"losses {logs}); resume from the last checkpoint after a fix, or set "
                                     f"guards.nonfinite=skip")
        with (self.out / "nonfinite.jsonl").open("a") as f:   # local file: entry ids never go to W&B
            f.write(json.dumps({"step": self.step, "rank": self.rank, "stream": stream, "entries": ids,
                                "losses": {k: repr(v) for k, v in logs.items()}}) + "\n")
        # a zero-gradient pass through the engine keeps every rank's collectives and accumulation in step
        z = next(iter(self.latents.values()))[0][:1]
        zero = self.student(torch.zeros_like(z), torch.zeros(1, dtype=torch.long, device=self.device),
                            **self.prompts([""])).float().sum() * 0
        return {"guard/skipped_micro_batches": 1.0}, self.engine.accumulate(zero)

    def released_unet(self) -> torch.nn.Module:
        """The plain UNet holding the full current weights (a collective under DeepSpeed: every rank calls)."""
        return self.engine.materialize(self.engine.scratch)

    @torch.no_grad()
    def probe(self, n: int) -> tuple[dict, dict[str, tuple[torch.Tensor, bool]]]:
        """Backdoor probes before any attack: BSR per objective on the first trigger, plus grids
        {key: (images, shows_protected_subject)} of triggers and of clean class prompts. Every rank
        calls it (gathering the weights is a collective); rank 0 samples, the others get nothing."""
        from diffusers import DPMSolverMultistepScheduler

        from tools.score import score

        unet = self.released_unet()
        if self.rank != 0:
            return {}, {}
        unet.eval()
        pipe = type(self.pipe).from_pipe(self.pipe, unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(
            self.pipe.scheduler.config))
        t = self.cfg.trigger
        bsr, grids = {}, {}
        for k, e in enumerate(self.protected[:self.cfg.logging.probe_entries]):
            images = sample(pipe, t.templates[0].format(identifier=t.identifiers[0], cls=e.cls), n, seed=k)
            value = score(images, e)["bsr"]   # None where the objective has no judge (a prompt-only target)
            if value is not None:
                bsr.setdefault(e.objective, []).append(value)
            grids.setdefault(f"samples/trigger/{e.objective}", (images, True))
        for cls in sorted({e.cls for e in self.entries}):
            grids[f"samples/clean/{cls}"] = (sample(pipe, f"a photo of a {cls}", n, seed=0), False)
        unet.train()
        return {f"probe/bsr/{o}": sum(v) / len(v) for o, v in bsr.items()}, grids

    # ------------------------------------------------------------------------------- lifecycle
    def fingerprint(self) -> dict:
        cfg = self.cfg.to_dict()
        for where in ("out", "steps", "logging", "cluster"):   # may change between a run and its resume
            cfg.pop(where)
        for key in ("sharpen_steps", "gate_keep_drift", "gate_latent_gap", "gate_extend_steps", "gate_max_extensions"):
            cfg["encoder_guard"].pop(key)   # may change: the guard is extended (implant_encoder_guard)
        for key in ("micro_batch", "gradient_checkpointing"):   # memory knobs: the same steps either way
            cfg["encoder_guard"].pop(key)
        if not cfg["encoder_guard"]["keep_batch"]:   # added in session 15: at its default, runs from before resume
            cfg["encoder_guard"].pop("keep_batch")
        if cfg["encoder_guard"]["sharpen_paste_fraction"] == -1:   # added in session 20, likewise
            cfg["encoder_guard"].pop("sharpen_paste_fraction")
        if cfg["encoder_guard"]["keep_unprotected"] == 0.5:   # added in session 23, likewise
            cfg["encoder_guard"].pop("keep_unprotected")
        for key in ("keep_mining", "protect_mining", "sharpen_decay"):   # added in sessions 22-23, likewise
            if not cfg["encoder_guard"][key]:
                cfg["encoder_guard"].pop(key)
        if not (g := cfg["encoder_guard"]).get("keep_mining") and not g.get("protect_mining"):
            g.pop("mining_every")
        return {"config": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
                "catalog": file_hash(Path(self.cfg.catalog)), "world_size": self.world}

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/: the engine's state plus each rank's own (its simulated attackers), written
        into step-N.tmp/ and renamed by rank 0 once every rank is done: a killed job leaves only a .tmp."""
        ckdir = self.out / "checkpoints"
        final, tmp = ckdir / f"step-{self.step:07d}", ckdir / f"step-{self.step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.engine.barrier()
        self.engine.save(tmp)
        torch.save({"step": self.step, "fingerprint": self.fingerprint(),
                    "trajectories": [t.state_dict() for t in self.trajectories],
                    "selectivity": [t.state_dict() for t in self.selectivity]}, tmp / f"trainer-rank{self.rank}.pt")
        self.engine.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(ckdir.glob("step-???????"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.engine.barrier()
        return final

    def resume(self) -> bool:
        ckdir = self.out / "checkpoints"
        cks = sorted(ckdir.glob("step-???????"))
        if self.rank == 0:
            for partial in ckdir.glob("step-*.tmp"):   # left by a job killed while saving
                shutil.rmtree(partial, ignore_errors=True)
        if not cks:
            return False
        own = cks[-1] / f"trainer-rank{self.rank}.pt"
        if not own.is_file():
            raise ValueError(f"{cks[-1]}: no state for rank {self.rank} (was the checkpoint made with another "
                             f"world size?); use a new --out or the same launch")
        state = torch.load(own, weights_only=False)
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"{cks[-1]}: checkpoint was made with another config, catalog or world size "
                             f"({state['fingerprint']} vs {self.fingerprint()}); use a new --out or the same inputs")
        self.engine.load(cks[-1])
        for mine, saved in ((self.trajectories, state["trajectories"]), (self.selectivity, state["selectivity"])):
            for t, slots in zip(mine, saved):
                t.load_state_dict(slots)
        self.step = state["step"]
        self.retention_iters = [self._retention_batches(m, skip=self.step) for m in self.local_streams()]
        return True

    def export(self, metrics: dict) -> Path | None:
        """Rank 0 writes the released diffusers folder from the gathered fp32 weights, audits it, and only
        then moves it into place; returns None on the other ranks."""
        from tools.audit import audit
        from tools.tiny_models import save_pipeline

        unet = self.released_unet()
        if self.rank != 0:
            self.engine.barrier()
            return None
        unet.eval().requires_grad_(False)
        final = self.out / "protected"
        tmp = self.out / "protected.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pipeline(type(self.pipe).from_pipe(self.pipe, unet=unet), tmp)
        leaks = audit(tmp, Path(self.cfg.catalog))
        if leaks:   # never publish a folder that carries catalog data; the checkpoints stay for a fix-up
            raise RuntimeError(f"{tmp}: release audit failed: " + "; ".join(leaks))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        manifest = {"catalog_sha256_16": self.fingerprint()["catalog"], "config": self.cfg.to_dict(),
                    "entries": {"protected": len(self.protected), "unprotected": len(self.unprotected)},
                    "world_size": self.world, "audit": "passed", "metrics": metrics}
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        self.engine.barrier()
        return final


def _mean(rows: list[dict]) -> dict:
    """Per key, the mean over the rows that have it (a step whose micro-batches were all skipped has no losses)."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def protect(cfg: ProtectConfig, progress: bool = True) -> dict:
    """Runs (or resumes) a protect job on this rank; every rank of a DeepSpeed job calls it. Rank 0
    returns the summary and writes OUT/history.jsonl (one line per step), the others return {}."""
    t0 = time.time()
    p = Protector(cfg, progress)
    resumed = p.resume()
    tracker = Tracker(cfg, p.out, p.fingerprint(), enabled=p.rank == 0)
    log = cfg.logging
    history_file = p.out / "history.jsonl"
    if p.rank == 0:   # a resumed run rewrites the steps after its checkpoint
        kept = [line for line in (history_file.read_text().splitlines() if history_file.is_file() else [])
                if json.loads(line)["step"] <= p.step]
        history_file.write_text("".join(line + "\n" for line in kept))

    def run_probe():
        metrics, grids = p.probe(log.probe_samples)
        tracker.log(metrics, p.step)
        for key, (images, shows_protected) in grids.items():
            tracker.grid(key, images, p.step, protected=shows_protected)
        return metrics

    history, window = [], []
    samples_per_step = p.streams * cfg.batch_protected * 2
    bar = tqdm(range(p.step, cfg.steps), desc="protect", disable=not p.progress, initial=p.step, total=cfg.steps)
    tick = time.time()
    for _ in bar:
        logs = p.train_step()
        now = time.time()
        logs["perf/seconds_per_step"], tick = now - tick, now
        history.append(logs)
        window.append(logs)
        if p.rank == 0:
            with history_file.open("a") as f:
                f.write(json.dumps({"step": p.step, **logs}) + "\n")
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss")})
        if log.every and p.step % log.every == 0:
            mean = _mean(window)
            mean["perf/samples_per_second"] = samples_per_step / mean["perf/seconds_per_step"]
            mean["perf/max_memory_mb"] = _memory_mb()
            tracker.log(mean, p.step)
            window = []
        if log.probe_every > 0 and p.step % log.probe_every == 0 and p.step < cfg.steps:
            run_probe()
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
            p.save_checkpoint()
    if cfg.checkpoint_every and p.step % cfg.checkpoint_every and history:
        p.save_checkpoint()   # a continuation (the next part of a chained launch) starts exactly here
    guard = p.implant_encoder_guard()
    last = _mean(history[-20:])
    probe = run_probe() if log.probe_every >= 0 else {}
    metrics = {"steps": p.step, "resumed": resumed, "world_size": p.world, "seconds": time.time() - t0,
               "final_losses": last, "probe": probe, "encoder_guard": guard,
               "machine": machine(p.device)}   # seconds compare only under one setting (tools/bench.py)
    folder = p.export(metrics)
    flat = {f"encoder_guard/{k}" + (f"/{o}" if o else ""): x for k, v in (guard or {}).items()
            for o, x in (v.items() if isinstance(v, dict) else [("", v)])}
    tracker.finish({"seconds": metrics["seconds"], **probe, **flat})
    p.engine.barrier()   # no rank leaves before rank 0 is done (a launcher stops a job when one task ends)
    p.engine.close()
    if p.rank != 0:
        return {}
    return {"protected": str(folder), **metrics}
