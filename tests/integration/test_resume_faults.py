"""Exact resume, preemption and parallelism equivalence of the real trainer (2 gloo ranks).

The resume tests train with patch dropout, so every step draws random numbers on every rank: a
resume is bitwise only if each rank's RNG streams continue exactly where the checkpoint left them.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, free_port, run_cli

pytestmark = pytest.mark.slow
STOCHASTIC = "model.patch_dropout=0.5"  # open_clip's towers draw a patch mask every step
SYNC_SAVES = "train.async_checkpoint=false"


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


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of the run's last checkpoint, read back with DCP into a fresh model."""
    from clipscale import checkpoint as ckpt
    from clipscale.config import config_from_dict
    from clipscale.models import build_model

    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    model = build_model(config_from_dict(ckpt.read_meta(path)["config"]).model).model
    ckpt.load_model_weights(path, model)
    return model.state_dict()


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Every step's loss and every final weight are bitwise those of the uninterrupted run."""
    assert step_losses(run_dir) == step_losses(reference_dir)
    got, want = final_weights(run_dir), final_weights(reference_dir)
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def torchrun(argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "clipscale", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL torchrun and every descendant by pid: torchrun starts each rank in its own session,
    so killing torchrun's process group would leave the ranks (and their loader workers) running.
    The tree is frozen with SIGSTOP first so no process can start a child that escapes the kill."""
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.append(pid)
            with contextlib.suppress(ProcessLookupError):  # it may have exited since pgrep saw it
                os.kill(pid, signal.SIGSTOP)
            todo += children(pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while any(alive(pid) for pid in tree):
        assert time.time() < deadline, f"processes still alive: {[p for p in tree if alive(p)]}"
        time.sleep(0.05)


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
    """Uninterrupted 2-rank run of a model without random draws (compared across world sizes)."""
    out = tmp_path_factory.mktemp("ref")
    run_cli(*args(synthetic_data, out, "ref"), nproc=2)
    return out / "ref"


@pytest.fixture(scope="module")
def reference(reference_run):
    return step_losses(reference_run)


@pytest.fixture(scope="module")
def stochastic_run(synthetic_data, tmp_path_factory):
    """Uninterrupted 2-rank run with patch dropout: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("stochastic")
    run_cli(*args(synthetic_data, out, "ref", STOCHASTIC), nproc=2)
    return out / "ref"


def latest_step(run_dir: Path) -> int:
    from clipscale.checkpoint import latest_checkpoint

    return int(latest_checkpoint(run_dir / "checkpoints").name.split("_")[1])


def test_patch_dropout_draws_random_numbers(stochastic_run, reference):
    """Guards the premise of the resume tests: the stochastic run really differs from the plain one."""
    assert step_losses(stochastic_run)[2] != reference[2]


@pytest.mark.parametrize("kill_after_step", [5, 13])
def test_sigkill_and_resume_is_bitwise_identical(stochastic_run, synthetic_data, tmp_path, kill_after_step):
    # Synchronous saves: the checkpoint of step 4 is complete once step 5 runs (an asynchronous
    # one completes a little later, and the short run might finish before the kill).
    proc = torchrun(args(synthetic_data, tmp_path, "killed", STOCHASTIC, SYNC_SAVES))
    wait_for_step(tmp_path / "killed", kill_after_step, proc)
    kill_tree(proc)  # the whole job: agent, ranks and loader workers, mid-step
    assert latest_step(tmp_path / "killed") < 20  # killed before the end: there is work to resume
    resumed = run_cli(*args(synthetic_data, tmp_path, "killed", STOCHASTIC), nproc=2)
    assert "resumed from" in resumed.stderr
    assert_same_run(tmp_path / "killed", stochastic_run)


def test_signal_on_one_rank_saves_and_stops_all(stochastic_run, synthetic_data, tmp_path):
    proc = torchrun(args(synthetic_data, tmp_path, "preempted", STOCHASTIC))
    run_dir = tmp_path / "preempted"
    wait_for_step(run_dir, 2, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGUSR1)  # only one rank hears it; both must stop together
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0, output
    assert "stopped at step" in output
    assert 2 <= latest_step(run_dir) < 20
    run_cli(*args(synthetic_data, tmp_path, "preempted", STOCHASTIC), nproc=2)
    assert_same_run(run_dir, stochastic_run)


def test_single_process_preemption_exit_code(synthetic_data, tmp_path):
    cmd = [sys.executable, "-m", "clipscale", *args(synthetic_data, tmp_path, "solo")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_step(tmp_path / "solo", 1, proc)
    assert json.loads((tmp_path / "solo" / "training.json").read_text())["pid"] == proc.pid  # for watchers
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    from clipscale.train import EXIT_PREEMPTED

    assert proc.returncode == EXIT_PREEMPTED
    assert (tmp_path / "solo" / "preempted").is_file() and not (tmp_path / "solo" / "training.json").exists()


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
