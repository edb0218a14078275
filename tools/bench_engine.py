"""Benchmark: seconds per optimizer step of the same protect job in one process and under DeepSpeed
ZeRO 1/2/3 with N ranks (same global batch: 1 process x N micro-batches vs N ranks x 1).

    python -m tools.bench_engine --catalog CATALOG [--ranks 2] [--steps 12] [--out runs/bench-engine]

Prints a table and writes OUT/bench.json. On CPU each rank gets cores / ranks threads; the numbers
are only comparable within one run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

JOB = ["batch_protected=2", "batch_unprotected=1", "prior.retention_batch=4", "retention.mode=restart",
       "retention.inner_steps=1", "logging.probe_every=-1", "checkpoint_every=0"]


def run(catalog: str, out: Path, steps: int, ranks: int, stage: int | None) -> float:
    """Median seconds per step, the first two steps (warm-up) left out."""
    args = ["-m", "tools.cli", "protect", f"catalog={catalog}", f"out={out}", f"steps={steps}", *JOB]
    if stage is None:
        cmd = [sys.executable, *args, f"grad_accum={ranks}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", *args,
               f"deepspeed=configs/zero{stage}.json"]
    threads = max(1, (os.cpu_count() or 2) // (1 if stage is None else ranks))
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    times = [json.loads(x)["perf/seconds_per_step"] for x in (out / "history.jsonl").read_text().splitlines()]
    return statistics.median(times[2:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="runs/bench-engine")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = {}
    for name, stage in (("1 process", None), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3)):
        rows[name] = run(a.catalog, out / name.replace(" ", "-"), a.steps, a.ranks, stage)
        print(f"{name:10s} {rows[name]:.3f} s/step", flush=True)
    base = rows["1 process"]
    report = {"ranks": a.ranks, "steps": a.steps, "seconds_per_step": rows,
              "zero3_over_zero2": rows["ZeRO-3"] / rows["ZeRO-2"],
              "ranks_over_one_process": {k: v / base for k, v in rows.items()}}
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"\n{a.ranks} ranks vs 1 process x {a.ranks} micro-batches (same global batch):")
    for k, v in rows.items():
        print(f"  {k:10s} {v:7.3f} s/step  ({v / base:.2f}x)")
    print(f"  ZeRO-3 / ZeRO-2: {report['zero3_over_zero2']:.2f}x")


if __name__ == "__main__":
    main()
