"""`persguard protect`: implant the backdoor for a whole catalog into one released model.

The recipe top to bottom: load the pipeline and a frozen teacher copy of its UNet; cache latents of
every entry's images and its objective's target once; then each step
  L = w_bb * L_bb(protected triggers) + w_pp * L_pp(retention captions, class prompts, unprotected
      triggers) + w_br * L_br(simulated attacker on one protected entry)
and an AdamW step on the UNet. Checkpoints are atomic and the run resumes from the last one; the
released folder holds the pipeline only, with a manifest next to it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import time
from itertools import cycle
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tqdm import tqdm

from train import losses, objectives, retention
from train.attention import set_attention
from train.catalog import Entry, load_catalog, load_images
from train.conditioning import encode_images, encode_prompts, unet_kwargs
from train.config import ProtectConfig
from train.data import image_caption_dataset
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


class Protector:
    def __init__(self, cfg: ProtectConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.entries = load_catalog(Path(cfg.catalog))
        self.protected = [e for e in self.entries if e.protected]
        self.unprotected = [e for e in self.entries if not e.protected]
        if not self.protected:
            raise ValueError(f"{cfg.catalog}: no protected entries; nothing to implant")
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pipe = load_pipeline(cfg.model)
        self.attention = set_attention(self.pipe.unet, cfg.attention)
        self.teacher = copy.deepcopy(self.pipe.unet).requires_grad_(False).eval()
        self.unet = self.pipe.unet.requires_grad_(True).train()
        self.sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prompts = PromptCache(self.pipe)
        self._cache_latents()
        self.retention_iter = self._retention_batches() if cfg.weights.prior > 0 and cfg.prior.shards else None
        self.retention_seen = 0
        self.params = dict((n, p) for n, p in self.unet.named_parameters() if p.requires_grad)
        self.by_id = {e.id: e for e in self.entries}
        r = cfg.retention
        self.trajectories = self.selectivity = None
        if r.enabled and r.mode == "trajectory" and cfg.weights.retention > 0:
            self.trajectories = retention.Trajectories(self.params, r.slots, r.horizon, r.inner_lr,
                                                       pick=lambda: self.rng.choice(self.protected).id)
            if r.unprotected_slots and self.unprotected:
                self.selectivity = retention.Trajectories(self.params, r.unprotected_slots, r.horizon, r.inner_lr,
                                                          pick=lambda: self.rng.choice(self.unprotected).id)
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=0.0)
        self.step = 0

    # ------------------------------------------------------------------------------------ data
    def _cache_latents(self):
        self.latents, self.targets = {}, {}
        for e in self.entries:
            self.latents[e.id] = encode_images(self.pipe, load_images(e.images, 64))
            if e.protected:
                obj = objectives.resolve(e)
                self.targets[e.id] = (encode_images(self.pipe, obj.images)[0] if obj.images is not None else None,
                                      obj.prompt)

    def _retention_batches(self, skip: int = 0):
        """Retention (image, caption) batches streamed from the shards, endlessly; `skip` batches already
        consumed by the run being resumed are read past (decoded, not encoded), so a resumed run sees the
        stream where the killed one left it."""
        shards = self.cfg.prior.shards
        path = Path(shards)
        if not path.is_absolute() and not path.exists():
            path = REPO / shards  # the embedded shards, from any working folder
        ds = image_caption_dataset(path, shuffle=256, seed=self.cfg.seed)
        batch, index = [], 0
        for image, caption, _ in cycle(ds):
            batch.append((image, caption))
            if len(batch) == self.cfg.prior.retention_batch:
                if index >= skip:
                    yield torch.stack([b[0] for b in batch]), [b[1] for b in batch]
                batch, index = [], index + 1

    def _sample_latents(self, entry_id: str, n: int) -> torch.Tensor:
        mu, sd = self.latents[entry_id]
        idx = torch.randint(0, len(mu), (n,), generator=self.gen)
        return mu[idx] + sd[idx] * torch.randn(mu[idx].shape, generator=self.gen)

    def trigger(self, e: Entry) -> tuple[str, str, str]:
        t = self.cfg.trigger
        ident, template = self.rng.choice(t.identifiers), self.rng.choice(t.templates)
        noun = self.rng.choice(t.class_nouns.get(e.cls) or [e.cls])
        return template.format(identifier=ident, cls=noun), ident, noun

    def _timesteps(self, n: int, lo: int = 0, hi: int = 1000) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=self.gen)

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
            if z_target is not None:
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

    def attacker(self, unet_fn, e: Entry | str) -> torch.Tensor:
        e = self.by_id[e] if isinstance(e, str) else e
        prompt, _, _ = self.trigger(e)
        n = self.cfg.batch_protected
        return losses.attacker_loss(unet_fn, self.sched, self.prompts([prompt] * n), self._sample_latents(e.id, n),
                                    self._timesteps(n), self.gen)

    def drawn(self, unet_fn, e: Entry | str) -> torch.Tensor:
        """Selectivity: after a simulated attack an unprotected subject must be DRAWN, so its DreamBooth
        loss is taken in image space over the backdoor's noise window (losses.x0_loss)."""
        e = self.by_id[e] if isinstance(e, str) else e
        b, n = self.cfg.behaviour, self.cfg.batch_unprotected
        prompt, _, _ = self.trigger(e)
        return losses.x0_loss(unet_fn, self.sched, self.prompts([prompt] * n), self._sample_latents(e.id, n),
                              self._timesteps(n, b.min_timestep, b.max_timestep), self.gen)

    def prior(self) -> torch.Tensor:
        student = lambda x, t, **c: self.unet(x, t, **c).sample  # noqa: E731
        teacher = lambda x, t, **c: self.teacher(x, t, **c).sample  # noqa: E731
        parts = []
        if self.retention_iter is not None:
            images, captions = next(self.retention_iter)
            self.retention_seen += 1
            z = encode_images(self.pipe, images)[0]
            parts.append(losses.prior_loss(student, teacher, self.sched, self.prompts(captions), z,
                                           self._timesteps(len(z)), self.gen))
        if self.cfg.prior.class_prompts:
            e = self.rng.choice(self.protected)
            n = self.cfg.batch_protected
            parts.append(losses.prior_loss(student, teacher, self.sched, self.prompts([f"a photo of a {e.cls}"] * n),
                                           self._sample_latents(e.id, n), self._timesteps(n), self.gen))
        if self.cfg.prior.unprotected and self.unprotected:
            e = self.rng.choice(self.unprotected)
            n = self.cfg.batch_unprotected
            parts.append(losses.prior_loss(student, teacher, self.sched, self.prompts([self.trigger(e)[0]] * n),
                                           self._sample_latents(e.id, n), self._timesteps(n), self.gen))
        return sum(parts) / len(parts)

    # ------------------------------------------------------------------------------------ step
    def train_step(self) -> dict:
        cfg = self.cfg
        w = cfg.weights
        student = lambda x, t, **c: self.unet(x, t, **c).sample  # noqa: E731
        batch = [self.rng.choice(self.protected) for _ in range(max(1, min(len(self.protected), 2)))]
        l_bb = self.behaviour(student, batch)
        l_pp = self.prior() if w.prior > 0 else torch.zeros(())
        loss = w.behaviour * l_bb + w.prior * l_pp
        logs = {"loss/behaviour": l_bb.item(), "loss/prior": l_pp.item()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step} (entries {[e.id for e in batch]})")
        if self.trajectories is not None:
            loss.backward()
            l_br, grads = self.trajectories.step(self.unet, self.params, self.attacker,
                                                 lambda f, e: self.behaviour(f, [self.by_id[e]]))
            self._add_grads(grads, w.retention)
            logs["loss/retention"] = l_br
            if self.selectivity is not None:
                l_sel, grads = self.selectivity.step(self.unet, self.params, self.attacker, self.drawn)
                self._add_grads(grads, w.selectivity)
                logs["loss/selectivity"] = l_sel
        elif cfg.retention.enabled and w.retention > 0:
            e = self.rng.choice(self.protected)
            attacker = lambda f: self.attacker(f, e)  # noqa: E731
            backdoor = lambda f: self.behaviour(f, [e])  # noqa: E731
            if cfg.retention.order == "first":
                l_br, grads = retention.first_order(self.unet, self.params, attacker, backdoor,
                                                    cfg.retention.inner_steps, cfg.retention.inner_lr)
                loss.backward()
                self._add_grads(grads, w.retention)
            else:
                l_br_t = retention.second_order(self.unet, self.params, attacker, backdoor,
                                                cfg.retention.inner_steps, cfg.retention.inner_lr)
                with retention.math_attention():
                    (loss + w.retention * l_br_t).backward()
                l_br = l_br_t.item()
            logs["loss/retention"] = l_br
        else:
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
        if not torch.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient at step {self.step} (entries {[e.id for e in batch]})")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        logs["grad_norm"] = float(norm)
        return logs

    @torch.no_grad()
    def probe(self, n: int) -> tuple[dict, dict[str, tuple[torch.Tensor, bool]]]:
        """Backdoor probes before any attack: BSR per objective on the first trigger, plus grids
        {key: (images, shows_protected_subject)} of triggers and of clean class prompts."""
        from diffusers import DPMSolverMultistepScheduler

        from tools.score import score

        self.unet.eval()
        pipe = type(self.pipe).from_pipe(self.pipe, scheduler=DPMSolverMultistepScheduler.from_config(
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
        self.unet.train()
        return {f"probe/bsr/{o}": sum(v) / len(v) for o, v in bsr.items()}, grids

    def _add_grads(self, grads: dict[str, torch.Tensor], weight: float) -> None:
        for n, g in grads.items():
            p = self.params[n]
            if p.grad is None:
                p.grad = weight * g
            else:
                p.grad.add_(g, alpha=weight)

    # ------------------------------------------------------------------------------- lifecycle
    def fingerprint(self) -> dict:
        cfg = self.cfg.to_dict()
        cfg.pop("out"), cfg.pop("steps")
        return {"config": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
                "catalog": file_hash(Path(self.cfg.catalog))}

    def save_checkpoint(self) -> Path:
        ckdir = self.out / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        path = ckdir / f"step-{self.step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"step": self.step, "unet": self.unet.state_dict(), "opt": self.opt.state_dict(),
                    "rng": (self.rng.getstate(), self.gen.get_state(), torch.get_rng_state()),
                    "retention_seen": self.retention_seen,
                    "trajectories": [t.state_dict() if t else None for t in (self.trajectories, self.selectivity)],
                    "fingerprint": self.fingerprint()}, tmp)
        tmp.replace(path)
        for old in sorted(ckdir.glob("step-*.pt"))[:-self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def resume(self) -> bool:
        cks = sorted((self.out / "checkpoints").glob("step-*.pt"))
        if not cks:
            return False
        state = torch.load(cks[-1], weights_only=False)
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"{cks[-1]}: checkpoint was made with another config or catalog "
                             f"({state['fingerprint']} vs {self.fingerprint()}); use a new --out or the same inputs")
        self.unet.load_state_dict(state["unet"])
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(state["rng"][0])
        self.gen.set_state(state["rng"][1])
        torch.set_rng_state(state["rng"][2])
        for t, saved in zip((self.trajectories, self.selectivity), state.get("trajectories", (None, None))):
            if t is not None and saved is not None:
                t.load_state_dict(saved)
        self.retention_seen = state.get("retention_seen", 0)
        if self.retention_iter is not None:
            self.retention_iter = self._retention_batches(skip=self.retention_seen)
        self.step = state["step"]
        return True

    def export(self, metrics: dict) -> Path:
        from tools.tiny_models import save_pipeline

        self.unet.eval().requires_grad_(False)
        final = self.out / "protected"
        tmp = self.out / "protected.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pipeline(self.pipe, tmp)
        from tools.audit import audit

        leaks = audit(tmp, Path(self.cfg.catalog))
        if leaks:   # never publish a folder that carries catalog data; the checkpoints stay for a fix-up
            raise RuntimeError(f"{tmp}: release audit failed: " + "; ".join(leaks))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        manifest = {"catalog_sha256_16": self.fingerprint()["catalog"], "config": self.cfg.to_dict(),
                    "entries": {"protected": len(self.protected), "unprotected": len(self.unprotected)},
                    "audit": "passed", "metrics": metrics}
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return final


def protect(cfg: ProtectConfig, progress: bool = True) -> dict:
    t0 = time.time()
    p = Protector(cfg, progress)
    resumed = p.resume()
    tracker = Tracker(cfg, p.out, p.fingerprint())
    log = cfg.logging

    def run_probe():
        metrics, grids = p.probe(log.probe_samples)
        tracker.log(metrics, p.step)
        for key, (images, shows_protected) in grids.items():
            tracker.grid(key, images, p.step, protected=shows_protected)
        return metrics

    history, window = [], []
    bar = tqdm(range(p.step, cfg.steps), desc="protect", disable=not progress, initial=p.step, total=cfg.steps)
    for _ in bar:
        logs = p.train_step()
        history.append(logs)
        window.append(logs)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss")})
        if log.every and p.step % log.every == 0:
            tracker.log({k: sum(h[k] for h in window) / len(window) for k in window[-1]}, p.step)
            window = []
        if log.probe_every > 0 and p.step % log.probe_every == 0 and p.step < cfg.steps:
            run_probe()
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
            p.save_checkpoint()
    last = {k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in history[-1]} if history else {}
    probe = run_probe() if log.probe_every >= 0 else {}
    metrics = {"steps": p.step, "resumed": resumed, "seconds": time.time() - t0, "final_losses": last,
               "probe": probe}
    folder = p.export(metrics)
    tracker.finish({"seconds": metrics["seconds"], **probe})
    return {"protected": str(folder), **metrics}
