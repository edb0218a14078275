"""One encoder-guard step on the real SDXL VAE (its published architecture, random init, no download): what
protects a release costs, per step, at SDXL size. The step is the guard's own (train/encoder_guard.py:
the teacher's moments of the targets and keep images, the student's passes through `_passes`, AdamW over
the encoder and quant_conv), on `--batch` protected photos and `--keep` keep images at `--resolution` px.
Reports step time, photos/s and peak memory, for the memory knobs the guard offers: `--micro-batch N`
(passes of at most N photos, gradients summed) and `--gradient-checkpointing` (blocks recomputed in backward).

    python -m tools.bench_guard_sdxl [--resolution 1024] [--batch 8] [--keep 4] [--micro-batch 2]
        [--gradient-checkpointing] [--dtype bf16|fp32] [--out DIR]
    python -m tools.bench_guard_sdxl --matrix --resolution 256 --out DIR   # every knob, each in its own process

A CPU reports the process's peak resident memory, which only grows: `--matrix` runs each setting in a
fresh process so every row's peak is its own (on CUDA the peak is reset per run as well).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tools.bench_sdxl import machine, peak_memory_mb, reset_peak, synchronize

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (83,653,863 parameters; the test checks it)
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "force_upcast": True,
}
# what `--matrix` compares: the guard's default, then each memory knob, then both
MATRIX = [{}, {"micro_batch": 2}, {"gradient_checkpointing": True}, {"micro_batch": 1, "gradient_checkpointing": True}]


def build_vae(device="cpu"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**SDXL_VAE)


def bench_guard_sdxl(resolution: int = 1024, batch: int = 8, keep: int = 4, micro_batch: int = 0,
                     gradient_checkpointing: bool = False, dtype: str | None = None, steps: int = 3, warmup: int = 1,
                     out: Path | None = None) -> dict:
    """Times `warmup + steps` guard steps; returns (and writes OUT/bench_guard_sdxl.json) the median."""
    from train.encoder_guard import _moments, _passes, _Student
    from train.protect import training_device

    if micro_batch < 0 or batch < 1 or keep < 0 or resolution % 8:
        raise ValueError(f"need micro_batch >= 0, batch >= 1, keep >= 0 and a resolution divisible by 8 (got "
                         f"{micro_batch}, {batch}, {keep}, {resolution})")
    device = training_device()
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    vae = build_vae().to(device).to(memory_format=torch.channels_last)
    teacher = build_vae().to(device).to(memory_format=torch.channels_last).requires_grad_(False).eval()
    teacher.load_state_dict(vae.state_dict())
    vae.requires_grad_(False)
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    if gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    student = _Student(vae)
    g = torch.Generator().manual_seed(0)
    photos, targets, kept = (torch.rand(n, 3, resolution, resolution, generator=g).to(device)
                             for n in (batch, batch, keep))
    weight = torch.ones(batch, 1, 1, 1, device=device)

    def step() -> float:
        synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            with torch.no_grad():
                want, keep_want = _moments(teacher, targets).float(), _moments(teacher, kept).float()
            _passes(student, photos, want, weight, kept, keep_want, 1.0, micro_batch, float(batch), keep, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - t

    reset_peak(device)
    times = [step() for _ in range(warmup + steps)]
    timed = times[warmup:] or times[-1:]
    median = statistics.median(timed)
    report = {"vae": "sdxl", "encoder_params": sum(p.numel() for p in params),
              "vae_params": sum(p.numel() for p in vae.parameters()), "resolution": resolution, "batch": batch,
              "keep": keep, "micro_batch": micro_batch, "gradient_checkpointing": gradient_checkpointing,
              "dtype": dtype, "first_step_s": times[0], "step_s": median, "step_times": timed,
              "photos_per_s": batch / median, "peak_memory_mb": peak_memory_mb(device), "machine": machine(device)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_guard_sdxl.json").write_text(json.dumps(report, indent=1))
    return report


def matrix(resolution: int, batch: int, keep: int, steps: int, warmup: int, dtype: str | None = None,
           out: Path | None = None, rows: list[dict] = MATRIX) -> list[dict]:
    """Each row of `rows` in a fresh process (its own peak memory); a row that fails records its error."""
    from tqdm import tqdm

    results = []
    for row in tqdm(rows, desc="guard step, SDXL VAE"):
        argv = [sys.executable, "-m", "tools.bench_guard_sdxl", "--json", "--resolution", str(resolution),
                "--batch", str(batch), "--keep", str(keep), "--steps", str(steps), "--warmup", str(warmup),
                "--micro-batch", str(row.get("micro_batch", 0))] + (["--dtype", dtype] if dtype else []) \
            + (["--gradient-checkpointing"] if row.get("gradient_checkpointing") else [])
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:   # e.g. out of memory: the rest still run
            results.append({**row, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                            f"exit {proc.returncode}"})
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "bench_guard_sdxl_matrix.json").write_text(json.dumps(results, indent=1))
            (Path(out) / "bench_guard_sdxl_matrix.md").write_text(markdown(results))
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| resolution | photos + keep | micro-batch | checkpointing | step s | photos/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| | | {r.get('micro_batch', 0)} | {bool(r.get('gradient_checkpointing'))} | {r['error']} | | |")
            continue
        lines.append(f"| {r['resolution']} | {r['batch']} + {r['keep']} | {r['micro_batch'] or '-'} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['step_s']:.2f} | {r['photos_per_s']:.2f} | "
                     f"{r['peak_memory_mb'] / 1024:.2f} |")
    if results and "machine" in results[0]:
        lines.append(f"\n[{results[0]['machine']['device_name']}, {results[0]['dtype']}]")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="protected photos a step")
    ap.add_argument("--keep", type=int, default=4, help="keep images a step")
    ap.add_argument("--micro-batch", type=int, default=0, help="at most this many photos a pass (0: one pass)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--matrix", action="store_true", help="every memory knob, each in its own process")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line (what --matrix reads)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else None
    if a.matrix:
        print(markdown(matrix(a.resolution, a.batch, a.keep, a.steps, a.warmup, a.dtype, out)))
        return
    r = bench_guard_sdxl(a.resolution, a.batch, a.keep, a.micro_batch, a.gradient_checkpointing, a.dtype,
                         a.steps, a.warmup, out)
    print(json.dumps(r) if a.json else markdown([r]))


if __name__ == "__main__":
    main()
