"""One training step of the real SDXL base UNet (its published architecture, random init, no download):
forward + backward + AdamW at 1024x1024-equivalent latents (4 x 128 x 128), batch 1-4. Reports step time,
peak memory, FLOPs per step and MFU (achieved FLOP/s over the GPU's bf16 dense peak).

    python -m tools.bench_sdxl [--batch 2] [--dtype bf16] [--attention sdpa|xformers] [--channels-last]
        [--gradient-checkpointing] [--compile] [--fused-adam] [--out DIR]     (= persguard bench --sdxl ...)
    python -m tools.bench_sdxl --reduced          # the same block structure at toy width: CPU tests
    python -m tools.bench_sdxl --flops-only       # FLOPs and parameters of the full UNet on any machine
    python -m tools.bench_sdxl --matrix --deadline 420 --out DIR   # the device check: every knob, one process

The GPU knobs, and why each is a flag rather than always on: bf16 autocast (fp32 master weights and AdamW
state, bf16 matmuls: the usual mixed precision); channels-last (tensor-core friendly convolutions); fused
AdamW (one kernel over all parameters instead of a loop of small ones); SDPA (PyTorch's flash /
memory-efficient kernels) or xformers; gradient checkpointing (trades a second forward for activation
memory: the recompute is NOT counted in MFU, which is model FLOPs); torch.compile (pays over long runs
only: its compile time shows as `first_step_s`, outside the timed steps).

FLOPs are counted once with torch.utils.flop_counter on a copy of the UNet on the meta device: no
arithmetic runs, so the count costs seconds even for the full model on a CPU, and it includes attention
(PyTorch's CPU flash kernel has no FLOP formula and a count on CPU tensors would miss it).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters; the test checks it)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],   # diffusers' legacy name: these are the head COUNTS (64 channels each)
    "use_linear_projection": True, "upcast_attention": False, "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,   # 1280 pooled text embedding + 6 time ids x 256
    "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
}
# The same blocks, depths pattern and conditioning at toy width (8M parameters, 128 px): CPU tests.
REDUCED_UNET = {**SDXL_UNET, "sample_size": 16, "block_out_channels": [32, 64, 128],
                "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [1, 2, 4],
                "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 64 + 6 * 8}
TEXT_TOKENS = 77
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; --peak-tflops overrides
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def cpu_model() -> str:
    """The CPU's model name ("cpu" where the OS does not say): two machines' seconds compare only when it matches
    (the development machines changed from an Intel CPU with AMX to an AVX2-only AMD one in session 27)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def machine(device: torch.device) -> dict:
    """Where the numbers were measured (they only compare within one machine)."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device), "device_name": cpu_model(),
            "load_average": list(os.getloadavg())}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    device_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(config: dict, device="cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**config)


def make_batch(config: dict, batch: int, resolution: int, device) -> dict:
    """Random latents (resolution / 8), timesteps, text states and SDXL's pooled embedding + time ids."""
    side = resolution // 8
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    size = [resolution, resolution, 0, 0, resolution, resolution]
    return {"x": rand(batch, config["in_channels"], side, side),
            "noise": rand(batch, config["out_channels"], side, side),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(device),
            "hidden": rand(batch, TEXT_TOKENS, config["cross_attention_dim"]),
            "added": {"text_embeds": rand(batch, pooled),
                      "time_ids": torch.tensor([size] * batch, dtype=torch.float32).to(device)}}


def forward_backward(unet, b: dict, bf16: bool) -> torch.Tensor:
    """The trainer's step minus the optimizer: epsilon MSE, bf16 autocast when asked (loss in fp32)."""
    with torch.autocast(b["x"].device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = unet(b["x"], b["t"], encoder_hidden_states=b["hidden"], added_cond_kwargs=b["added"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), b["noise"])
    loss.backward()
    return loss


def count_flops(config: dict, batch: int, resolution: int) -> dict:
    """FLOPs of one forward + backward, on the meta device (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(config, "meta")
    b = make_batch(config, batch, resolution, "meta")
    with FlopCounterMode(display=False) as counter:
        pred = unet(b["x"], b["t"], encoder_hidden_states=b["hidden"], added_cond_kwargs=b["added"]).sample
        forward = counter.get_total_flops()
        torch.nn.functional.mse_loss(pred, b["noise"]).backward()
    return {"flops_per_step": counter.get_total_flops(), "forward_flops": forward,
            "params": sum(p.numel() for p in unet.parameters())}


@functools.lru_cache(maxsize=None)
def _flops(reduced: bool, batch: int, resolution: int) -> tuple:
    """count_flops, once per shape: the knobs below do not change the model's FLOPs (seconds each on a CPU)."""
    return tuple(count_flops(REDUCED_UNET if reduced else SDXL_UNET, batch, resolution).items())


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench_sdxl(reduced: bool = False, batch: int = 1, resolution: int | None = None, dtype: str | None = None,
               attention: str = "sdpa", channels_last: bool = False, gradient_checkpointing: bool = False,
               compile: bool = False, fused_adam: bool = False, steps: int = 5, warmup: int = 2,
               peak: float | None = None, flops_only: bool = False, out: Path | None = None,
               progress: bool = True) -> dict:
    """Measures the step (module docstring); returns the report and writes OUT/bench_sdxl.json."""
    config = REDUCED_UNET if reduced else SDXL_UNET
    resolution = resolution or config["sample_size"] * 8
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")   # CPU bf16 autocast: 1.2x slower here (no AMX)
    report = {"unet": "sdxl-base-reduced" if reduced else "sdxl-base", "batch": batch, "resolution": resolution,
              "latent": [config["in_channels"], resolution // 8, resolution // 8], "dtype": dtype,
              "attention": attention, "channels_last": channels_last, "gradient_checkpointing": gradient_checkpointing,
              "compile": compile, "fused_adam": fused_adam, "steps": steps, "warmup": warmup,
              **dict(_flops(reduced, batch, resolution)), "machine": machine(device)}
    if not flops_only:
        report.update(_time_steps(config, report, device, progress))
        tflops = peak_tflops(device, peak)
        achieved = report["flops_per_step"] / report["step_s"]
        report.update(achieved_flops_per_s=achieved, peak_tflops=tflops,
                      mfu=achieved / (tflops * 1e12) if tflops and device.type == "cuda" else None)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_sdxl.json").write_text(json.dumps(report, indent=1))
    return report


def _time_steps(config: dict, r: dict, device: torch.device, progress: bool) -> dict:
    from tqdm import tqdm

    unet = build_unet(config).to(device).train()
    if r["attention"] == "xformers":
        from train.attention import resolve

        resolve("xformers", device)   # a clear error where xformers cannot run
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if r["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    b = make_batch(config, r["batch"], r["resolution"], device)
    if r["channels_last"]:
        unet = unet.to(memory_format=torch.channels_last)
        b["x"] = b["x"].contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=r["fused_adam"] or None)
    model = torch.compile(unet) if r["compile"] else unet
    bf16 = r["dtype"] == "bf16"

    def step() -> float:
        synchronize(device)
        t = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        forward_backward(model, b, bf16)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return time.perf_counter() - t

    reset_peak(device)
    times = []
    for _ in tqdm(range(r["warmup"] + r["steps"]), desc=r["unet"], disable=not progress):
        times.append(step())
    timed = times[r["warmup"]:] or times[-1:]
    median = statistics.median(timed)
    return {"first_step_s": times[0], "step_s": median, "step_times": timed,
            "samples_per_s": r["batch"] / median, "peak_memory_mb": peak_memory_mb(device)}


# The device check (`--matrix`): which knobs pay, most important first, since a GPU lease is minutes and
# `--deadline` skips what no longer fits. Every row: bf16 on CUDA; the first row is the plain step.
KNOBS = {"channels_last": True, "fused_adam": True}
MATRIX = [{"batch": 1}, {"batch": 1, **KNOBS}, {"batch": 2, **KNOBS}, {"batch": 4, **KNOBS},
          {"batch": 1, "attention": "xformers", **KNOBS}, {"batch": 2, "attention": "xformers", **KNOBS},
          {"batch": 4, "attention": "xformers", **KNOBS}, {"batch": 4, "gradient_checkpointing": True, **KNOBS},
          {"batch": 2, **KNOBS, "compile": True}]


def matrix(reduced: bool = False, rows: list[dict] = MATRIX, steps: int = 5, warmup: int = 2,
           peak: float | None = None, deadline_s: float | None = None, out: Path | None = None) -> list[dict]:
    """Runs bench_sdxl for each row in one process; a row that fails (out of memory, xformers missing)
    records its error and the rest go on. OUT/bench_sdxl_matrix.json and .md are rewritten after every
    row, so a run stopped by its time limit still leaves what it measured."""
    from tqdm import tqdm

    start, results = time.monotonic(), []
    for row in tqdm(rows, desc="SDXL step matrix"):
        base = {"batch": 1, "attention": "sdpa", "channels_last": False, "gradient_checkpointing": False,
                "compile": False, "fused_adam": False, **row}
        if deadline_s is not None and time.monotonic() - start > deadline_s:
            results.append({**base, "skipped": f"past the {deadline_s:.0f} s deadline"})
        else:
            try:
                results.append(bench_sdxl(reduced=reduced, steps=steps, warmup=warmup, peak=peak, progress=False,
                                          **row))
            except Exception as e:   # noqa: BLE001 - one knob failing must not cost the others' numbers
                results.append({**base, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tqdm.write(matrix_row(results[-1]))
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "bench_sdxl_matrix.json").write_text(json.dumps(results, indent=1))
            (Path(out) / "bench_sdxl_matrix.md").write_text(matrix_markdown(results))
    return results


MATRIX_COLUMNS = "| batch | attention | knobs | step ms | samples/s | peak GiB | FLOP/s | MFU |"


def matrix_row(r: dict) -> str:
    knobs = ", ".join(k.replace("_", "-") for k in ("channels_last", "fused_adam", "gradient_checkpointing",
                                                      "compile") if r.get(k)) or "plain"
    head = f"| {r['batch']} | {r['attention']} | {knobs} |"
    if "step_s" not in r:
        return f"{head} {r.get('error') or r.get('skipped')} | | | | |"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    return (f"{head} {r['step_s'] * 1000:.1f} | {r['samples_per_s']:.2f} | {r['peak_memory_mb'] / 1024:.1f} | "
            f"{_si(r['achieved_flops_per_s'])} | {mfu} |")


def matrix_markdown(results: list[dict]) -> str:
    done = [r for r in results if "step_s" in r]
    where = f" on {done[0]['machine']['device_name']}, {done[0]['dtype']}" if done else ""
    lines = [f"# One SDXL UNet training step{where}", "", MATRIX_COLUMNS, "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [matrix_row(r) for r in results]) + "\n"


def add_arguments(p: argparse.ArgumentParser, common: bool = True) -> None:
    """The SDXL step's options (`common`: also --steps/--warmup/--out, which `persguard bench` shares)."""
    p.add_argument("--reduced", action="store_true", help="toy-width UNet of the same structure (CPU tests)")
    p.add_argument("--batch", type=int, default=1, help="latents per step (the issue asks 1-4)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 1024; 128 reduced)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="bf16 autocast (fp32 weights) or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="attention kernels")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time: first_step_s)")
    p.add_argument("--fused-adam", action="store_true", help="fused AdamW kernel")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's bf16 dense peak for MFU (default: known GPUs, e.g. 989 for H100/H200)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs and parameters only (no device step)")
    p.add_argument("--matrix", action="store_true", help="the device check: every knob in MATRIX, one process, "
                   "OUT/bench_sdxl_matrix.{json,md}")
    p.add_argument("--deadline", type=float, default=None, help="with --matrix: skip the rows not started "
                   "within this many seconds")
    if common:
        p.add_argument("--steps", type=int, default=5, help="timed steps")
        p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator, kernels)")
        p.add_argument("--out", default=None, help="write OUT/bench_sdxl.json")


def run(a: argparse.Namespace) -> dict | list:
    if a.matrix:
        results = matrix(reduced=a.reduced, steps=a.steps, warmup=a.warmup, peak=a.peak_tflops,
                         deadline_s=a.deadline, out=Path(a.out) if a.out else None)
        print(matrix_markdown(results))
        return results
    report = bench_sdxl(reduced=a.reduced, batch=a.batch, resolution=a.resolution, dtype=a.dtype,
                        attention=a.attention, channels_last=a.channels_last,
                        gradient_checkpointing=a.gradient_checkpointing, compile=a.compile, fused_adam=a.fused_adam,
                        steps=a.steps, warmup=a.warmup, peak=a.peak_tflops, flops_only=a.flops_only,
                        out=Path(a.out) if a.out else None)
    print(summary(report))
    return report


def _si(x: float) -> str:
    return next(f"{x / 10**e:.2f} {p}" for e, p in ((12, "T"), (9, "G"), (6, "M"), (0, "")) if x >= 10**e or not e)


def summary(r: dict) -> str:
    lines = [f"{r['unet']}: {r['params'] / 1e6:,.1f} M parameters, batch {r['batch']} at {r['resolution']} px "
             f"(latents {'x'.join(map(str, r['latent']))}), {_si(r['flops_per_step'])}FLOP per step "
             f"(forward {_si(r['forward_flops'])}FLOP)"]
    if "step_s" in r:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no GPU peak)"
        lines.append(f"{r['dtype']} step {r['step_s'] * 1000:.1f} ms (first {r['first_step_s']:.2f} s), "
                     f"{r['samples_per_s']:.2f} samples/s, peak memory {r['peak_memory_mb'] / 1024:.2f} GiB, "
                     f"{_si(r['achieved_flops_per_s'])}FLOP/s, MFU {mfu}  [{r['machine']['device_name']}]")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
