"""Run tracking for `persguard protect`: Weights & Biases, offline unless the user opts in.

Logs every loss term, backdoor probes (BSR of each objective on the trigger prompts, before any attack)
and sample grids. What may leave the machine is decided here, in one place:
- metrics are aggregated per objective / class, never per entry (entry ids are catalog data);
- grids of clean class prompts are always logged; grids of protected entries' triggers only when
  `logging.upload_protected_images` is true (they may depict the protected subjects).
WANDB_MODE in the environment wins over the config (offline | online | disabled).
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import torch

from train.config import ProtectConfig
from train.sampling import mosaic


def git_commit() -> str | None:
    """The project's commit (None outside a git checkout), so a run names the code that made it."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    def __init__(self, cfg: ProtectConfig, out: Path, fingerprint: dict, enabled: bool = True):
        """`enabled=False` on every rank but 0: one run per job."""
        self.cfg = cfg.logging
        mode = os.environ.get("WANDB_MODE") or self.cfg.wandb_mode
        self.run = None
        if mode == "disabled" or not enabled:
            return
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb-run-id"   # one W&B run across resumes of the same output folder
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        for attempt in range(30):
            try:
                self.run = wandb.init(project=self.cfg.project, mode=mode, dir=str(out), id=run_id, resume="allow",
                                      config={**cfg.to_dict(), "fingerprint": fingerprint, "git_commit": git_commit()},
                                      settings=wandb.Settings(silent=True, console="off"))
                break
            except Exception as e:   # noqa: BLE001 - wandb raises a generic error type here
                # a requeued job can start while its previous incarnation's W&B process still holds the
                # run (measured under Slurm: "run ID ... is in use"); wait for it rather than fork the run
                if "in use" not in str(e) or attempt == 29:
                    raise
                time.sleep(2)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def grid(self, key: str, images: torch.Tensor, step: int, protected: bool) -> bool:
        """Logs a sample grid; returns False (and logs nothing) where the privacy rule forbids it."""
        if self.run is None or (protected and not self.cfg.upload_protected_images):
            return False
        import wandb

        self.run.log({key: wandb.Image(mosaic([images]))}, step=step)
        return True

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            for k, v in summary.items():
                self.run.summary[k] = v
            self.run.finish()
