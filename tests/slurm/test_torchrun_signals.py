"""A scheduler's stop signal reaching torchrun (not a rank) ends in a checkpoint and exit 75.

torchrun forwards SIGTERM to each rank's whole process group, DataLoader workers included, and by
default dies of SIGUSR1, leaving its ranks (in sessions of their own) running. Both paths must
still end with every rank saved and gone, and the run's `preempted` marker written.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow


def train_args(data: dict, run_dir: Path) -> list[str]:
    return [
        "train", f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
        f'run.output_dir="{run_dir.parent}"', f"run.name={run_dir.name}", "log.progress_bar=false",
        "train.global_batch_size=32", "train.total_samples=64000", "train.log_every_steps=1",
        "train.checkpoint_every_samples=64", "train.num_threads=1",
    ]


def steps_saved(run_dir: Path) -> list[int]:
    from clipscale.checkpoint import complete_checkpoints

    return [int(p.name.split("_")[1]) for p in complete_checkpoints(run_dir / "checkpoints")]


def processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names `run_dir` (ranks and their DataLoader workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run_dir).encode() in (proc / "cmdline").read_bytes():
                if (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                    pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def signal_torchrun_after_first_checkpoint(data: dict, run_dir: Path, sig: signal.Signals) -> tuple[int, str, int]:
    """Start 2 ranks under torchrun, send `sig` to torchrun once a checkpoint exists; returns
    (torchrun's exit code, its output, the first checkpoint's step) after every rank is gone."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "clipscale", *train_args(data, run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not steps_saved(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-4000:]
            time.sleep(0.1)
        first = steps_saved(run_dir)[0]
        proc.send_signal(sig)
        output = proc.communicate(timeout=120)[0].decode()
        deadline = time.monotonic() + 60
        while processes_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes_of(run_dir), f"ranks still running 60 s after {sig.name} to torchrun:\n{output[-4000:]}"
        return proc.returncode, output, first
    finally:
        for pid in processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_saved_and_preempted(run_dir: Path, first_step: int, output: str) -> None:
    from clipscale.train import EXIT_PREEMPTED, PREEMPTED_MARKER

    assert "is killed by signal" not in output, output[-4000:]  # no DataLoader worker died of it
    assert max(steps_saved(run_dir)) > first_step, output[-4000:]  # a checkpoint at the stop
    marker = run_dir / PREEMPTED_MARKER
    assert marker.is_file() and marker.read_text().strip() == str(EXIT_PREEMPTED), output[-4000:]


def test_sigterm_to_torchrun_saves_and_stops(synthetic_data, tmp_path):
    run_dir = tmp_path / "term"
    code, output, first = signal_torchrun_after_first_checkpoint(synthetic_data, run_dir, signal.SIGTERM)
    assert code != 0  # torchrun reports its ranks' exit 75 as a failure; the marker says preempted
    assert output.count("stopped at step") >= 1
    assert_saved_and_preempted(run_dir, first, output)


def test_sigusr1_kills_default_torchrun_but_ranks_still_save(synthetic_data, tmp_path):
    run_dir = tmp_path / "usr1"
    code, output, first = signal_torchrun_after_first_checkpoint(synthetic_data, run_dir, signal.SIGUSR1)
    assert code == -signal.SIGUSR1  # torchrun does not handle SIGUSR1 unless told to (--signals_to_handle)
    assert_saved_and_preempted(run_dir, first, output)
