"""`persguard launch`: a protect job through submitit, on Slurm or on this machine.

One task per GPU (or `cluster.tasks_per_node` CPU tasks); each task reads its rank, the world size and
the rendezvous (MASTER_ADDR / MASTER_PORT) from submitit's JobEnvironment and runs `train.protect` under
the config's DeepSpeed engine. On a timeout or preemption signal submitit requeues the job
(`ProtectJob.checkpoint`); the requeued job resumes from the last atomic checkpoint of OUT, losing only
the steps since it (the trainer's state lives on disk, not in the pickle). A run longer than one job's
time limit is `cluster.parts` chained jobs over the same OUT, job k training up to step
ceil(steps * (k + 1) / parts) with the WHOLE catalog sampled at every step: one model holds the whole
catalog (splitting the catalog into parts and merging models would not make one protected model).
"""
from __future__ import annotations

import math
import os
import shutil
import zlib
from pathlib import Path

import submitit

from train.config import ProtectConfig, load_config


def rendezvous_port(job_id: str) -> int:
    """A port every task of a job agrees on without talking: derived from the job id (a requeued job
    keeps its id, and its old processes are gone)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


class ProtectJob(submitit.helpers.Checkpointable):
    """The callable submitit pickles: the config file and overrides, never model state."""

    def __init__(self, config: str | None, overrides: list[str]):
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        # sbatch exports the submitter's environment; a W&B service address in it would make every job
        # (and every requeue) share the submitter's service, which keeps a killed job's run id "in use"
        os.environ.pop("WANDB_SERVICE", None)
        os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(rendezvous_port(str(env.job_id))))
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        from train.protect import protect

        return protect(load_config(self.config, self.overrides), progress=env.global_rank == 0)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the timeout / preemption signal: requeue the same job; it resumes from
        OUT/checkpoints (anything after the last checkpoint is recomputed; train/tracking.py waits for
        the old W&B process to let go of the run id)."""
        return submitit.helpers.DelayedSubmission(ProtectJob(self.config, self.overrides))


def executor_for(cfg: ProtectConfig) -> submitit.AutoExecutor:
    c = cfg.cluster
    kind = c.executor
    if kind == "auto":
        kind = "slurm" if shutil.which("sbatch") else "local"
    folder = Path(c.folder or Path(cfg.out) / "submitit")
    tasks = c.tasks_per_node or max(1, c.gpus_per_node)
    if tasks * c.nodes > 1 and not cfg.deepspeed:
        raise ValueError(f"cluster: {tasks * c.nodes} tasks need a DeepSpeed config (deepspeed=configs/zero2.json)")
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=c.max_requeues)
    # generic parameters, then each executor's own (submitit applies only the running executor's prefix)
    ex.update_parameters(name="persguard-protect", timeout_min=c.time_min, nodes=c.nodes, tasks_per_node=tasks,
                         cpus_per_task=c.cpus_per_task, gpus_per_node=c.gpus_per_node or None,
                         mem_gb=c.mem_gb or None, slurm_signal_delay_s=c.signal_delay_s,
                         slurm_partition=c.partition or None, slurm_account=c.account or None,
                         slurm_constraint=c.constraint or None)
    return ex


def launch(config: str | None, overrides: list[str] = (), wait: bool = False) -> list:
    """Submits the run (`cluster.parts` chained jobs); returns the submitit jobs. With `wait`, returns
    after the last one finished (and raises if one failed)."""
    cfg = load_config(config, overrides)
    parts = cfg.cluster.parts
    ex = executor_for(cfg)
    jobs = []
    for k in range(parts):
        upto = math.ceil(cfg.steps * (k + 1) / parts)
        job_overrides = [*overrides, f"steps={upto}"]
        if jobs and ex.cluster == "slurm":    # Slurm chains the parts; locally they run one after another
            ex.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{jobs[-1].job_id}"})
        elif jobs:
            jobs[-1].results()
        jobs.append(ex.submit(ProtectJob(config, job_overrides)))
    if wait:
        for job in jobs:
            job.results()
    return jobs
