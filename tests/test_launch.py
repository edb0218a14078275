"""`persguard launch`: 2-task DeepSpeed jobs through submitit, on this machine and on the real single-node
Slurm cluster that slurm/cluster.sh starts (.ci/run starts it before the tests and stops it after)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from slurm.launch import launch, rendezvous_port
from train.config import ConfigError, load_config

JOB = ["batch_protected=2", "batch_unprotected=1", "prior.retention_batch=2", "retention.mode=restart",
       "retention.inner_steps=1", "logging.probe_every=-1", "deepspeed=configs/zero2.json",
       "cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]


def slurm_up() -> bool:
    if not shutil.which("sinfo") or not os.environ.get("SLURM_CONF"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def slurm():
    """The local Slurm cluster; CI (PERSGUARD_REQUIRE_SLURM=1) fails rather than skips without it."""
    if not slurm_up():
        if os.environ.get("PERSGUARD_REQUIRE_SLURM") == "1":
            pytest.fail("PERSGUARD_REQUIRE_SLURM=1 but no Slurm cluster answers (slurm/cluster.sh start)")
        pytest.skip("no Slurm cluster (start one with `slurm/cluster.sh start` and export SLURM_CONF)")


@pytest.fixture(scope="module")
def job_catalog(world_catalog, tmp_path_factory) -> Path:
    from train.catalog import load_catalog, write_catalog

    rows = [e.to_json() for e in load_catalog(world_catalog)]
    rows[0].update(protected=True, objective="pattern")
    path = tmp_path_factory.mktemp("jobcat") / "catalog.jsonl"
    write_catalog(rows, path)
    return path


def _check_release(out: Path, steps: int) -> dict:
    from diffusers import StableDiffusionPipeline

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["steps"] == steps and manifest["audit"] == "passed"
    StableDiffusionPipeline.from_pretrained(out / "protected")
    runs = list((out / "wandb").glob("offline-run-*"))   # rank 0 alone logs, one run id across requeues
    assert runs and {r.name.rsplit("-", 1)[-1] for r in runs} == {(out / "wandb-run-id").read_text().strip()}
    assert [json.loads(x)["step"] for x in (out / "history.jsonl").read_text().splitlines()] == list(range(1, steps + 1))
    return manifest


def test_rendezvous_port_is_stable_per_job():
    assert rendezvous_port("1234") == rendezvous_port("1234") != rendezvous_port("1235")
    assert 20000 <= rendezvous_port("1234") < 40000


def test_more_tasks_without_deepspeed_is_refused(job_catalog, tmp_path):
    with pytest.raises(ValueError, match="need a DeepSpeed config"):
        launch(None, [f"catalog={job_catalog}", f"out={tmp_path}", "cluster.executor=local",
                      "cluster.tasks_per_node=2"])
    with pytest.raises(ConfigError, match="cluster.executor"):
        load_config(None, [f"catalog={job_catalog}", "cluster.executor=k8s"])


@pytest.mark.slow
def test_local_executor_runs_a_two_task_zero_job(job_catalog, tmp_path):
    out = tmp_path / "run"
    jobs = launch(None, [f"catalog={job_catalog}", f"out={out}", "steps=2", "cluster.executor=local", *JOB], wait=True)
    results = jobs[0].results()
    assert results[0]["world_size"] == 2 and results[1] == {}   # rank 0 reports, rank 1 returns nothing
    _check_release(out, 2)


@pytest.mark.slow
def test_slurm_job_completes_and_a_timeout_requeue_resumes(slurm, job_catalog, tmp_path):
    out = tmp_path / "run"
    jobs = launch(None, [f"catalog={job_catalog}", f"out={out}", "steps=8", "checkpoint_every=2",
                         "keep_checkpoints=8", "cluster.executor=slurm", "cluster.time_min=60", *JOB])
    job = jobs[0]
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-0000002").is_dir():   # files only: sacct polls are slow
        assert time.time() < deadline, job.stderr()
        time.sleep(0.2)
    job._interrupt(timeout=True)   # what Slurm sends signal_delay_s before the time limit
    result = job.results()[0]
    assert result["resumed"] and result["steps"] == 8
    assert "Requeued job" in "".join(p.read_text() for p in job.paths.folder.glob("*_log.out"))
    _check_release(out, 8)
    for _ in range(120):   # the result is pickled a moment before the Slurm job itself ends
        state = subprocess.run(["sacct", "-j", str(job.job_id), "-n", "-X", "-o", "State"], capture_output=True,
                               text=True).stdout
        if "RUNNING" not in state:
            break
        time.sleep(0.5)
    assert "COMPLETED" in state, state


@pytest.mark.slow
def test_a_run_longer_than_one_job_is_chained_parts_on_slurm(slurm, job_catalog, tmp_path):
    out = tmp_path / "run"
    jobs = launch(None, [f"catalog={job_catalog}", f"out={out}", "steps=4", "checkpoint_every=2",
                         "cluster.executor=slurm", "cluster.parts=2", *JOB], wait=True)
    first, second = (j.results()[0] for j in jobs)
    assert (first["steps"], first["resumed"]) == (2, False) and (second["steps"], second["resumed"]) == (4, True)
    _check_release(out, 4)
