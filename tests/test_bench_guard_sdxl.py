"""The encoder guard's step on the SDXL VAE (tools/bench_guard_sdxl.py), at toy resolution on the CPU."""
import json

from tools.bench_guard_sdxl import bench_guard_sdxl, markdown, matrix


def test_the_guard_step_runs_on_the_published_sdxl_vae_and_reports_its_cost(tmp_path):
    r = bench_guard_sdxl(resolution=64, batch=2, keep=1, micro_batch=1, gradient_checkpointing=True, steps=1,
                         warmup=0, out=tmp_path)
    assert r["vae_params"] == 83_653_863   # the published config, built with random weights
    assert r["encoder_params"] == 34_163_664   # what the guard trains: encoder + quant_conv
    assert r["dtype"] == "fp32" and r["step_s"] > 0 and r["photos_per_s"] == 2 / r["step_s"]
    assert r["peak_memory_mb"] > 4 * r["vae_params"] * 2 / 2**20   # two VAEs' fp32 weights at least
    assert json.loads((tmp_path / "bench_guard_sdxl.json").read_text())["step_s"] == r["step_s"]


def test_the_matrix_runs_each_setting_in_its_own_process_and_keeps_a_failing_row(tmp_path):
    rows = matrix(resolution=64, batch=2, keep=1, steps=1, warmup=0, out=tmp_path,
                  rows=[{"micro_batch": 1}, {"micro_batch": -1}])
    assert rows[0]["micro_batch"] == 1 and rows[0]["machine"]["device"] == "cpu"
    assert "error" in rows[1] and "error" not in rows[0]   # the bad row is recorded, the good one measured
    assert json.loads((tmp_path / "bench_guard_sdxl_matrix.json").read_text()) == rows
    assert "| 64 | 2 + 1 | 1 | no |" in markdown(rows)
