"""Exact resume, preemption and parallelism equivalence of the real trainer (2 gloo ranks)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, run_cli

pytestmark = pytest.mark.slow


def args(data: dict, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
        f'run.output_dir="{out}"', f"run.name={name}", "log.progress_bar=false",
        "train.global_batch_size=32", "train.total_samples=640", "train.log_every_steps=1",
        "train.checkpoint_every_samples=128", "optim.warmup_samples=64", *extra,
    ]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss of each step; a step re-run after a resume overwrites its earlier line."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def torchrun(argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "clipscale", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_cli(*args(synthetic_data, out, "ref"), nproc=2)
    return out / "ref"


@pytest.fixture(scope="module")
def reference(reference_run):
    return step_losses(reference_run)


def latest_step(run_dir: Path) -> int:
    from clipscale.checkpoint import latest_checkpoint

    return int(latest_checkpoint(run_dir / "checkpoints").name.split("_")[1])


@pytest.mark.parametrize("kill_after_step", [5, 13])
def test_sigkill_and_resume_is_bitwise_identical(reference, synthetic_data, tmp_path, kill_after_step):
    proc = torchrun(args(synthetic_data, tmp_path, "killed"))
    wait_for_step(tmp_path / "killed", kill_after_step, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: agent and ranks, mid-step
    proc.wait()
    assert latest_step(tmp_path / "killed") < 20  # killed before the end: there is work to resume
    resumed = run_cli(*args(synthetic_data, tmp_path, "killed"), nproc=2)
    assert "resumed from" in resumed.stderr
    assert step_losses(tmp_path / "killed") == reference  # every step, bitwise


def test_signal_on_one_rank_saves_and_stops_all(reference, synthetic_data, tmp_path):
    proc = torchrun(args(synthetic_data, tmp_path, "preempted"))
    run_dir = tmp_path / "preempted"
    wait_for_step(run_dir, 2, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(max(workers)), signal.SIGUSR1)  # only one rank hears it; both must stop together
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0, output
    assert "stopped at step" in output
    assert 2 <= latest_step(run_dir) < 20
    run_cli(*args(synthetic_data, tmp_path, "preempted"), nproc=2)
    assert step_losses(run_dir) == reference


def test_single_process_preemption_exit_code(synthetic_data, tmp_path):
    cmd = [sys.executable, "-m", "clipscale", *args(synthetic_data, tmp_path, "solo")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path / "solo", 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    from clipscale.train import EXIT_PREEMPTED

    assert proc.returncode == EXIT_PREEMPTED


def test_fsdp_and_ddp_match_one_process(reference, synthetic_data, tmp_path):
    run_cli(*args(synthetic_data, tmp_path, "fsdp", "train.parallel=fsdp"), nproc=2)
    run_cli(*args(synthetic_data, tmp_path, "single"), nproc=1)
    fsdp, single = step_losses(tmp_path / "fsdp"), step_losses(tmp_path / "single")
    steps = sorted(reference)
    assert [fsdp[s] for s in steps] == pytest.approx([reference[s] for s in steps], rel=1e-4)
    assert [single[s] for s in steps] == pytest.approx([reference[s] for s in steps], rel=1e-4)


def test_resume_across_world_sizes_and_parallelism(reference_run, reference, synthetic_data, tmp_path):
    """Saved on 2 DDP ranks, continued on 1 process, then on 2 FSDP2 ranks: same trajectory."""
    name = "hop"
    shutil.copytree(reference_run, tmp_path / name)
    ckpts = tmp_path / name / "checkpoints"
    for p in sorted(ckpts.glob("step_*"))[2:]:  # keep steps 4 and 8: resume from 8 on one process
        shutil.rmtree(p)
    run_cli(*args(synthetic_data, tmp_path, name), nproc=1)
    for p in sorted(ckpts.glob("step_*"))[3:]:  # resume from step 12 (saved by one process) on FSDP2
        shutil.rmtree(p)
    run_cli(*args(synthetic_data, tmp_path, name, "train.parallel=fsdp"), nproc=2)
    hop = step_losses(tmp_path / name)
    steps = sorted(reference)
    assert [hop[s] for s in steps] == pytest.approx([reference[s] for s in steps], rel=1e-4)
