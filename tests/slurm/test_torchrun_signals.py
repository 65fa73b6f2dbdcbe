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
    from clipscale.run_state import PREEMPTED
    from clipscale.train import EXIT_PREEMPTED

    assert "is killed by signal" not in output, output[-4000:]  # no DataLoader worker died of it
    assert max(steps_saved(run_dir)) > first_step, output[-4000:]  # a checkpoint at the stop
    marker = run_dir / PREEMPTED
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


def start_torchrun(data: dict, run_dir: Path, *extra: str, torchrun_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """2 ranks under torchrun, in a session of its own (as a terminal's foreground job is)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *torchrun_args, "-m", "clipscale", *train_args(data, run_dir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> int:
    deadline = time.monotonic() + 300
    while not steps_saved(run_dir):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-4000:]
        time.sleep(0.1)
    return steps_saved(run_dir)[0]


def wait_until_gone(run_dir: Path, what: str, proc: subprocess.Popen, timeout_s: float = 120) -> str:
    """torchrun's output once every process of the run has exited; processes still there after
    `timeout_s` (a liveness bound, generous for a loaded machine) are killed and fail the test."""
    deadline = time.monotonic() + timeout_s
    while processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = processes_of(run_dir)
    for pid in survivors:  # they hold torchrun's output pipe open
        os.kill(pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0].decode()
    assert not survivors, f"processes {survivors} still running {timeout_s} s after {what}:\n{output[-4000:]}"
    return output


def cleanup(run_dir: Path, proc: subprocess.Popen) -> None:
    for pid in processes_of(run_dir):
        os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ctrl_c_under_torchrun_saves_and_stops(synthetic_data, tmp_path):
    """SIGINT to torchrun's process group, as a terminal sends it: the ranks save at the next sync
    point and exit 75 (marker written), without a KeyboardInterrupt traceback per rank."""
    run_dir = tmp_path / "ctrl_c"
    proc = start_torchrun(synthetic_data, run_dir)
    try:
        first = wait_for_checkpoint(proc, run_dir)
        os.killpg(proc.pid, signal.SIGINT)
        output = wait_until_gone(run_dir, "Ctrl-C", proc)
        assert "KeyboardInterrupt" not in output, output[-4000:]
        assert "received SIGINT" in output and output.count("stopped at step") >= 1, output[-4000:]
        assert_saved_and_preempted(run_dir, first, output)
    finally:
        cleanup(run_dir, proc)


def test_second_ctrl_c_stops_at_once(synthetic_data, tmp_path):
    """A second Ctrl-C ends the ranks without waiting for the next sync point (here hundreds of steps
    away) and without tracebacks; torchrun would wait 10 minutes before killing them itself."""
    run_dir = tmp_path / "ctrl_c2"
    proc = start_torchrun(synthetic_data, run_dir, "train.log_every_steps=1000",
                          "train.checkpoint_every_samples=32000", torchrun_args=("--shutdown_timeout=600",))
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").exists():  # written once the ranks handle signals
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-4000:]
            time.sleep(0.1)
        ranks = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(2)
        assert all(alive(pid) for pid in ranks), "the first Ctrl-C must only ask for a stop at the next sync point"
        os.killpg(proc.pid, signal.SIGINT)
        output = wait_until_gone(run_dir, "two Ctrl-C", proc)
        assert "KeyboardInterrupt" not in output, output[-4000:]
        assert not (run_dir / "preempted").exists() and not steps_saved(run_dir)  # nothing saved on the way out
    finally:
        cleanup(run_dir, proc)


def test_a_lost_rank_and_launcher_leave_no_orphans(synthetic_data, tmp_path):
    """Node loss in miniature: torchrun and rank 1 (with its DataLoader worker) are SIGKILLed. Rank 0
    and its worker must exit by themselves (its collectives fail, its launcher is gone)."""
    run_dir = tmp_path / "lost"
    proc = start_torchrun(synthetic_data, run_dir, "data.workers=1")
    try:
        wait_for_checkpoint(proc, run_dir)
        ranks = {rank_of(pid): pid for pid in children(proc.pid)}
        assert sorted(ranks) == [0, 1], ranks
        doomed = [proc.pid, ranks[1], *children(ranks[1])]
        for pid in doomed:
            os.kill(pid, signal.SIGSTOP)  # freeze first: none may react to another's death
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        wait_until_gone(run_dir, "losing torchrun and rank 1", proc)
    finally:
        cleanup(run_dir, proc)


def rank_of(pid: int) -> int:
    env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    return int(env[b"RANK"])


def _ppid(proc_dir: Path) -> int:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]


def test_a_frozen_peer_fails_the_collective_after_the_configured_timeout(synthetic_data, tmp_path):
    """Rank 1 stops (SIGSTOP: its connections stay open, it never answers). Rank 0 gives up on its next
    collective after train.collective_timeout_s, exits with the error, and torchrun ends the job."""
    run_dir = tmp_path / "frozen"
    proc = start_torchrun(synthetic_data, run_dir, "train.collective_timeout_s=5")
    try:
        wait_for_checkpoint(proc, run_dir)
        os.kill(max(children(proc.pid), key=rank_of), signal.SIGSTOP)
        output = wait_until_gone(run_dir, "freezing rank 1", proc, timeout_s=180)
        assert "[rank0]" in output and "timed out" in output.lower(), output[-4000:]
    finally:
        cleanup(run_dir, proc)
