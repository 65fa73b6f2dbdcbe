"""slurm/train.sbatch, slurm/eval.sbatch and `clipscale sweep` on a real two-node SLURM cluster.

Every training run here has world size 2 and the same global batch, so its final weights must
equal, bit for bit, those of one uninterrupted 2-process torchrun run on this machine.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli
from tests.slurm.cluster import FINAL_STATES, job_processes

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TRAIN = str(REPO / "slurm" / "train.sbatch")


def train_args(data: dict, out: Path, name: str) -> list[str]:
    return [
        f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
        f'run.output_dir="{out}"', f"run.name={name}", "log.progress_bar=false", "train.num_threads=1",
        "train.global_batch_size=16", "train.total_samples=384", "train.log_every_steps=1",
        "train.checkpoint_every_samples=64", "optim.warmup_samples=64",
    ]


def submit_train(cluster, data: dict, out: Path, name: str, *, launch: str = "torchrun") -> int:
    """slurm/train.sbatch on both nodes, one task per node (torchrun) or per rank (srun)."""
    return cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--chdir={REPO}",
                          f"--output={out}/{name}-%j.out", TRAIN, *train_args(data, out, name),
                          env={"CLIPSCALE_PYTHON": sys.executable, "CLIPSCALE_LAUNCH": launch})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict of the run's last checkpoint, read back into a fresh model."""
    from clipscale import checkpoint as ckpt
    from clipscale.config import config_from_dict
    from clipscale.models import build_model

    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    model = build_model(config_from_dict(ckpt.read_meta(path)["config"]).model).model
    ckpt.load_model_weights(path, model)
    return model.state_dict()


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def job_log(run_dir: Path, job_id: int) -> str:
    log = run_dir / "logs" / f"job-{job_id}.log"
    return log.read_text() if log.exists() else f"(no {log})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def jobs(slurm_cluster, synthetic_data, runs):
    """The training jobs, submitted together so that they run side by side and with the reference."""
    missing = {**synthetic_data, "train": str(runs / "missing-{000000..000007}.tar")}
    return {"torchrun": submit_train(slurm_cluster, synthetic_data, runs, "torchrun"),
            "srun": submit_train(slurm_cluster, synthetic_data, runs, "srun", launch="srun"),
            "preempted": submit_train(slurm_cluster, synthetic_data, runs, "preempted"),
            "failed": submit_train(slurm_cluster, missing, runs, "failed")}


@pytest.fixture(scope="module")
def reference(jobs, synthetic_data, runs):
    run_cli("train", *train_args(synthetic_data, runs, "reference"), nproc=2)
    return final_weights(runs / "reference")


def latest_step(run_dir: Path) -> int:
    from clipscale.checkpoint import complete_checkpoints

    return max((int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir / "checkpoints")), default=0)


def wait_for_new_checkpoint(cluster, job: int, run_dir: Path) -> None:
    """Until the job's current start saves a checkpoint: it is training (a requeued start is started at once)."""
    seen = latest_step(run_dir)
    deadline = time.monotonic() + 600
    while latest_step(run_dir) <= seen:
        info = cluster.settled(job)
        assert info["JobState"] not in FINAL_STATES and time.monotonic() < deadline, \
            f"{info}\n{job_log(run_dir, job)[-6000:]}"
        if info.get("Reason") == "BeginTime":
            cluster.start_requeued(job)
        time.sleep(0.5)


def wait_for_restarts(cluster, job: int, restarts: int) -> None:
    deadline = time.monotonic() + 300
    while cluster.job(job).get("Restarts") != str(restarts):
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.5)


def test_preempted_twice_requeues_resumes_and_matches(slurm_cluster, jobs, runs, request):
    # First: its job is already running. The reference trains only once both stops are done.
    run_dir, job = runs / "preempted", jobs["preempted"]
    for restarts in (1, 2):
        wait_for_new_checkpoint(slurm_cluster, job, run_dir)
        slurm_cluster.scancel("--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@N does
        wait_for_restarts(slurm_cluster, job, restarts)
    info = slurm_cluster.wait(job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert log.count("exited 75 on a signal: requeueing") == 2, log[-4000:]
    assert log.count("resumed from") == 2, log[-4000:]
    assert not (run_dir / "preempted").exists()
    assert_bitwise_equal(final_weights(run_dir), request.getfixturevalue("reference"))


def test_scheduler_requeue_saves_resumes_and_matches(slurm_cluster, synthetic_data, runs, request):
    """`scontrol requeue` (what a preemption does): SLURM itself sends SIGTERM to every process of
    the job, requeues it, and kills what is left after KillWait. The ranks save at the next step.
    Submitted here, not with the others: the job must still be running when this test starts."""
    run_dir, job = runs / "requeued", submit_train(slurm_cluster, synthetic_data, runs, "requeued")
    wait_for_new_checkpoint(slurm_cluster, job, run_dir)
    slurm_cluster.scontrol("requeue", str(job))
    wait_for_restarts(slurm_cluster, job, 1)
    info = slurm_cluster.wait(job)
    log = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "received SIGTERM: saving and stopping" in log and log.count("resumed from") == 1, log[-4000:]
    assert_bitwise_equal(final_weights(run_dir), request.getfixturevalue("reference"))


def test_lost_node_leaves_no_orphans_and_the_requeued_job_matches(slurm_cluster, synthetic_data, runs, request):
    """Every process of the job on n2 (its torchrun, rank and loader worker) is SIGKILLed after a
    checkpoint. Everything else of that start must end by itself, and the next start resumes bitwise."""
    run_dir, job = runs / "node_lost", submit_train(slurm_cluster, synthetic_data, runs, "node_lost")
    wait_for_new_checkpoint(slurm_cluster, job, run_dir)
    lost = job_processes(job, node="n2")
    assert len(lost) >= 3, lost  # torchrun, its rank, the rank's DataLoader worker
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # frozen first: none reacts to another's death
        for pid in lost:
            os.kill(pid, sig)
    info = slurm_cluster.wait(job)  # the step is killed (srun --kill-on-bad-exit=1), the job ends
    assert info["JobState"] == "FAILED", f"{info}\n{job_log(run_dir, job)[-4000:]}"
    deadline = time.monotonic() + 120
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(1)
    survivors = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in job_processes(job)}
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"left running after the job ended: {survivors}"
    # What SLURM's requeue after a node failure starts; a job of its own here, as a requeue of the
    # killed job can be cancelled by the nodes' late cleanup of its previous start on a loaded host.
    again = submit_train(slurm_cluster, synthetic_data, runs, "node_lost")
    info = slurm_cluster.wait(again)
    log = job_log(run_dir, again)
    assert info["JobState"] == "COMPLETED" and "resumed from" in log, log[-4000:]
    assert_bitwise_equal(final_weights(run_dir), request.getfixturevalue("reference"))


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_two_nodes_train_like_one(slurm_cluster, jobs, reference, runs, launch):
    job = jobs[launch]
    info = slurm_cluster.wait(job)
    log = job_log(runs / launch, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    assert "on n[1-2]" in log and "world_size=2" in log  # one process group over both nodes
    if launch == "srun":
        assert "torch.distributed.run" not in log
    assert_bitwise_equal(final_weights(runs / launch), reference)


def test_failed_run_is_not_requeued(slurm_cluster, jobs, runs):
    info = slurm_cluster.wait(jobs["failed"])
    log = job_log(runs / "failed", jobs["failed"])
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-4000:]
    assert "missing-" in log and "requeueing" not in log


def test_sweep_array_with_chained_eval(slurm_cluster, synthetic_data, tmp_path):
    recipe = tmp_path / "grid.toml"
    recipe.write_text((REPO / "recipes" / "tiny_cpu.toml").read_text().replace('name = "tiny_cpu"', 'name = "grid"')
                      + '\n[sweep]\nsamples = [{ name = "s64", "train.total_samples" = 64 },'
                        ' { name = "s96", "train.total_samples" = 96 }]\n')
    overrides = [f'data.train_shards="{synthetic_data["train"]}"',
                 f'eval.datasets=["synthetic={synthetic_data["zeroshot"]}"]',
                 f'run.output_dir="{tmp_path / "runs"}"', "train.global_batch_size=32", "train.num_threads=1",
                 "train.checkpoint_every_samples=32", "log.progress_bar=false", "optim.warmup_samples=32"]

    def sweep(*options: str, sbatch: str = "", code: int = 0) -> str:
        cmd = [sys.executable, "-m", "clipscale", "sweep", str(recipe), *overrides,
               f"--sbatch-args=--nodes=1 --cpus-per-task=1 --output={tmp_path}/train-%A_%a.out {sbatch}",
               f"--eval-sbatch-args=--cpus-per-task=1 --output={tmp_path}/eval-%j.out", *options]
        env = {**slurm_cluster.env, "CLIPSCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    refused = sweep(sbatch="--partition=nosuch", code=2)  # sbatch says why; nothing is queued
    assert "clipscale: error: sbatch --parsable --array=0,1" in refused and "invalid partition" in refused
    dry = sweep("--dry-run")
    assert "array_job=$(sbatch --parsable --array=0,1 " in dry and '--dependency=afterok:"$array_job"' in dry
    submitted = sweep()
    eval_job = submitted.split("submitted eval job ")[1].split()[0]
    info = slurm_cluster.wait(eval_job, timeout_s=600)
    assert info["JobState"] == "COMPLETED", (tmp_path / f"eval-{eval_job}.out").read_text()[-4000:]
    for name, steps in (("grid-s64", 2), ("grid-s96", 3)):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "results.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == steps
        assert all(r["task"] == "zeroshot_classification" for r in rows)
    again = sweep("--dry-run")  # both points hold their final checkpoint: nothing left to train
    assert again.count("finished, skipped") == 2 and "array_job" not in again
