"""The optimizer side of `persguard protect`: plain AdamW in one process, or DeepSpeed ZeRO 1/2/3.

Both engines expose the same few operations, so the trainer holds no DeepSpeed special cases:
- `forward`: the trained UNet (under ZeRO-3 a partitioned module whose forward gathers its weights);
- `accumulate(loss, extra)`: backward of one micro-batch's loss plus EXTRA gradients computed outside
  the engine (the simulated attackers of train/retention.py take gradients at displaced weights, which
  the engine cannot see); at the accumulation boundary the extra gradients are averaged over ranks and
  added to the engine's reduced gradients, then the (clipped) optimizer step runs;
- `full_params()`: the current full weights, detached (gathered under ZeRO-3), for simulated attacks;
- `materialize(module)`: copies the full fp32 weights into a plain module (probes, the release);
- `save(dir)` / `load(dir)`: per-engine checkpoint folders, made atomic by the trainer.

The simulated attacker never edits the engine's parameters in place: it runs functionally on a plain,
unpartitioned copy (`scratch`), so "perturb, gradient, restore" is correct under every ZeRO stage
(stages 1/2 keep an fp32 master copy in-place edits do not reach; stage 3 keeps only a shard).
Gradient semantics are identical: the step's gradient is the mean over ranks and micro-batches.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, submitit, deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def functional_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of the UNet for `functional_call` at displaced weights (the simulated attackers), with
    gradient checkpointing OFF: its recomputation runs in backward, after functional_call has put the
    module's own weights back, so it would take the gradient at the wrong weights (measured: grad norm
    3.257 vs 3.281; under ZeRO-3 the recompute check fails outright)."""
    scratch = copy.deepcopy(unet).requires_grad_(False)
    if scratch.is_gradient_checkpointing:
        scratch.disable_gradient_checkpointing()
    return scratch


class LocalEngine:
    """One process; `accum` micro-batches per step (the single-process reference of a ZeRO run)."""

    rank, world = 0, 1

    def __init__(self, unet: torch.nn.Module, lr: float, accum: int = 1, clip: float = 1.0):
        self.unet, self.accum, self.clip = unet, accum, clip
        self.params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        self.opt = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=0.0)
        self.extra: dict[str, torch.Tensor] = {}
        self.micro = 0
        self.scratch = functional_copy(unet) if unet.is_gradient_checkpointing else unet

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    def full_params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def _add_extra(self, extra: dict[str, torch.Tensor] | None, weight: float) -> None:
        for n, g in (extra or {}).items():
            g = g * (weight / self.accum)
            self.extra[n] = self.extra[n] + g if n in self.extra else g

    def accumulate(self, loss: torch.Tensor, extra: dict | None = None, weight: float = 1.0) -> float | None:
        """Backward of one micro-batch; returns the gradient norm (before clipping) at a step, else None."""
        (loss / self.accum).backward()
        self._add_extra(extra, weight)
        self.micro += 1
        if self.micro % self.accum:
            return None
        for n, g in self.extra.items():
            p = self.params[n]
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.extra = {}
        norm = torch.nn.utils.clip_grad_norm_(self.params.values(), self.clip)
        if torch.isfinite(norm):
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def materialize(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.unet

    def save(self, folder: Path) -> None:
        torch.save({"unet": self.unet.state_dict(), "opt": self.opt.state_dict()}, folder / "engine.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "engine.pt", weights_only=False)
        self.unet.load_state_dict(state["unet"])
        self.opt.load_state_dict(state["opt"])

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        return values


def load_deepspeed_config(path: str | Path, lr: float, accum: int, micro_batch: int) -> dict:
    """A DeepSpeed JSON config with the run's own lr / accumulation filled in (one source of truth:
    the PersGuard config), `"bf16": {"enabled": "auto"}` resolved to "on CUDA"."""
    path = Path(path)
    if not path.is_file():
        from train.pipelines import REPO

        path = REPO / path if (REPO / path).is_file() else path
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    ds["gradient_accumulation_steps"] = accum
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds.pop("train_batch_size", None)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"].update(lr=lr)
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = torch.cuda.is_available()
    return ds


class DeepSpeedEngine:
    """A DeepSpeed engine over the UNet only: the teacher, text encoders and VAE stay plain frozen modules
    outside it (copied BEFORE initialize: a deepcopy of a ZeRO-3 module copies empty shards)."""

    def __init__(self, unet: torch.nn.Module, ds_config: dict):
        import deepspeed
        import deepspeed.ops

        if not torch.cuda.is_available():
            # the shm allreduce op speeds up CPU inference only and costs a ~3 min JIT compile; gloo suffices
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.scratch = functional_copy(unet)
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.accum = ds_config["gradient_accumulation_steps"]
        self.engine, *_ = deepspeed.initialize(model=unet, model_parameters=[p for p in unet.parameters()
                                                                             if p.requires_grad], config=ds_config)
        self.params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.extra: dict[str, torch.Tensor] = {}

    def forward(self, *args, **kwargs):
        """Floating inputs follow the engine's dtype (bf16 on GPU); latents and conditioning stay fp32
        outside it, and the losses are taken in fp32."""
        dtype = next(iter(self.params.values())).dtype
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        args = [cast(a) for a in args]
        kwargs = {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v))
                  for k, v in kwargs.items()}
        return self.engine(*args, **kwargs)

    def _gathered(self, params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None, enabled=self.stage == 3)

    def full_params(self) -> dict[str, torch.Tensor]:
        """fp32 copies (under bf16, of the bf16 weights: the attacker fine-tunes the released precision)."""
        with self._gathered(self.params.values()):
            return {n: p.detach().float().clone() for n, p in self.params.items()}

    def accumulate(self, loss: torch.Tensor, extra: dict | None = None, weight: float = 1.0) -> float | None:
        from deepspeed.utils import safe_update_full_grad_vectorized

        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)      # scales by 1 / accum and reduces over ranks at the boundary
        for n, g in (extra or {}).items():
            g = g * (weight / self.accum)
            self.extra[n] = self.extra[n] + g if n in self.extra else g
        if boundary:
            names = list(self.params)
            # every rank must take part in the collectives, even without extra gradients of its own
            flat = torch.cat([self.extra.get(n, torch.zeros_like(self.scratch.get_parameter(n))).flatten()
                              for n in names])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            extra, offset = {}, 0
            for n in names:
                numel = self.scratch.get_parameter(n).numel()
                extra[id(self.params[n])] = flat[offset:offset + numel].view_as(self.scratch.get_parameter(n))
                offset += numel
            self.extra = {}
            safe_update_full_grad_vectorized(list(self.params.values()),
                                             lambda g, p: g + extra[id(p)].to(g.dtype).view_as(g))
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def materialize(self, module: torch.nn.Module) -> torch.nn.Module:
        """The full fp32 weights (the optimizer's master copy) in `module`: a collective on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param

        own = dict(module.named_parameters())
        for n, p in self.params.items():
            full = safe_get_full_fp32_param(p)
            with torch.no_grad():
                own[n].copy_(full.view_as(own[n]))
        return module

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint in it")

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group: a rank that exits with gloo's threads still running can abort at
        interpreter shutdown ("terminate called without an active exception", seen once under load)."""
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over ranks, in one collective (every rank must pass the same keys)."""
        keys = sorted(values)
        # nccl reduces CUDA tensors only
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                         device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))


def make_engine(unet: torch.nn.Module, cfg) -> LocalEngine | DeepSpeedEngine:
    if not cfg.deepspeed:
        world = distributed_env()[1]
        if world > 1:   # every rank would train alone and write the same out as rank 0
            raise ValueError(f"launched on {world} ranks without a DeepSpeed config: set deepspeed= (e.g. "
                             "configs/zero2.json) or launch one process")
        return LocalEngine(unet, cfg.lr, cfg.grad_accum)
    return DeepSpeedEngine(unet, load_deepspeed_config(cfg.deepspeed, cfg.lr, cfg.grad_accum, cfg.batch_protected))
