"""A real two-node SLURM cluster on this host, for the `slurm` tests.

Debian's SLURM 22.05 packages (installed with apt-get when missing), munge, one `slurmctld` and
two `slurmd -N n1|n2` daemons whose configuration, spool and logs live in a temporary directory
(`SLURM_CONF` points clients at it). The nodes are named n1 and n2 and resolve to 127.0.0.1 via
/etc/hosts, so a rendezvous on "the first host of the nodelist" works as on a real cluster.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
NODES = ("n1", "n2")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
CPUS_PER_NODE = 4  # virtual: lets the tests' 1-CPU jobs run side by side


class Unavailable(RuntimeError):
    """SLURM cannot be brought up here (no root, no apt-get); the message says why."""


def _run(*cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def ensure_installed() -> None:
    """Install the Debian SLURM and munge packages unless they are already there."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root (apt-get)")
    if shutil.which("apt-get") is None:
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run("apt-get", "update", "-qq", env=env)
    _run("apt-get", "install", "-y", "-qq", *PACKAGES, env=env)


def _start_munge() -> bool:
    """Start munged with a key of its own unless one is running; True when started here."""
    if _run("munge", "-n", check=False).returncode == 0:
        return False
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force")
    return True


def _add_hosts() -> None:
    hosts = Path("/etc/hosts")
    known = hosts.read_text().split()
    missing = [n for n in NODES if n not in known]
    if missing:
        with hosts.open("a") as f:
            f.write("".join(f"127.0.0.1 {n}\n" for n in missing))


def _slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    nodes = "".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={17001 + i} CPUs={CPUS_PER_NODE} "
        f"RealMemory=4000 State=UNKNOWN\n" for i, n in enumerate(NODES))
    return f"""ClusterName=clipscaletest
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={root}/ctld
SlurmctldLogFile={root}/slurmctld.log
SlurmctldPidFile={root}/slurmctld.pid
SlurmdSpoolDir={root}/spool/%n
SlurmdLogFile={root}/slurmd.%n.log
SlurmdPidFile={root}/slurmd.%n.pid
KillWait=30
SlurmdParameters=config_overrides
MinJobAge=3600
{nodes}PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """slurmctld + two slurmd daemons configured under `root`; `env` is what clients need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.started_munge = False

    def start(self, timeout_s: float = 60) -> None:
        if _run("pgrep", "-x", "slurmctld", check=False).returncode == 0:
            raise Unavailable("a slurmctld is already running on this host; stop it to run the slurm tests")
        self.started_munge = _start_munge()
        _add_hosts()
        for d in ("ctld", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_slurm_conf(self.root))
        _run("/usr/sbin/slurmctld", "-f", str(self.conf), "-c", env=self.env)
        for n in NODES:
            _run("/usr/sbin/slurmd", "-f", str(self.conf), "-N", n, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = _run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False).stdout.split()
            if states.count("idle") == len(NODES):
                return
            time.sleep(1)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s}s: {states}; logs in {self.root}")

    def stop(self) -> None:
        """Cancel what is still queued or running (a failed test's jobs), then stop the daemons."""
        jobs = _run("squeue", "-h", "-o", "%A", env=self.env, check=False).stdout.split()
        if jobs:
            _run("scancel", *jobs, env=self.env, check=False)
            deadline = time.monotonic() + 90  # KillWait=30 s, then SIGKILL
            while _run("squeue", "-h", env=self.env, check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        _run("scontrol", "shutdown", env=self.env, check=False)  # slurmctld and every slurmd
        for pid_file in self.root.glob("slurm*.pid"):
            _wait_gone(pid_file)
        if self.started_munge:
            _run("pkill", "-F", "/run/munge/munged.pid", check=False)

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit a job with the client environment plus `env`; returns its id."""
        out = _run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); empty once purged."""
        out = _run("scontrol", "-o", "show", "job", str(job_id), env=self.env, check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def settled(self, job_id: int | str, *, for_s: float = 20) -> dict[str, str]:
        """The job's state; a final-looking one only once it has held for `for_s` seconds: a job
        requeueing itself passes through its exit state (FAILED after exit 75) before it is pending
        again, for several seconds on a loaded host."""
        info = self.job(job_id)
        deadline = time.monotonic() + for_s
        while info.get("JobState") in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(1)
            info = self.job(job_id)
        return info

    def wait(self, job_id: int | str, *, timeout_s: float = 300) -> dict[str, str]:
        """Poll until the job has ended for good; a requeued job is started at once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.settled(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                self.start_requeued(job_id)
            time.sleep(1)
        raise AssertionError(f"job {job_id} not ended after {timeout_s}s: {self.job(job_id)}")

    def start_requeued(self, job_id: int | str) -> None:
        """Start a requeued job now instead of after SLURM's requeue delay (~2 min), but not at once:
        started within a second of its requeue, the job is killed ("Job credential revoked") while
        the nodes still clean up its previous start."""
        time.sleep(5)
        self.scontrol("update", f"JobId={job_id}", "StartTime=now")

    def scontrol(self, *args: str) -> str:
        return _run("scontrol", *args, env=self.env).stdout

    def scancel(self, *args: str) -> None:
        _run("scancel", *args, env=self.env)


def job_processes(job_id: int | str, *, node: str | None = None) -> list[int]:
    """Live processes of a job (every process SLURM started for it, and their children, carries
    SLURM_JOB_ID in its environment), on one virtual node when `node` is given."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, IndexError):
            continue
        if env.get(b"SLURM_JOB_ID") == str(job_id).encode() and node in (None, env.get(b"SLURMD_NODENAME", b"").decode()):
            pids.append(int(proc.name))
    return pids


def _wait_gone(pid_file: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_file.exists() and time.monotonic() < deadline:
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
        except (ProcessLookupError, ValueError):
            return
        time.sleep(0.5)
