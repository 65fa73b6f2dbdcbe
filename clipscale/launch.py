"""Where this process sits as its launcher (torchrun or srun) describes it, before any process group.

Plain environment reading without torch: the CLI reads the rank for its log format, and
`clipscale train --print-run-dir` (run at every sbatch start) stays quick. The process group
itself is started in clipscale.dist.
"""
from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """This process's place as its launcher describes it, before any process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str = "env://"
    """Where ranks meet: torchrun's env:// variables, or tcp://HOST:PORT under a bare srun."""


def launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), else those of an srun job step.

    Under `srun` without torchrun every task is a rank: SLURM_PROCID, SLURM_NTASKS and
    SLURM_LOCALID; the ranks meet at MASTER_ADDR:MASTER_PORT when set, else at the first host of
    SLURM_STEP_NODELIST on `slurm_port(SLURM_JOB_ID)`. A batch script's own shell has no
    SLURM_STEP_ID, so a `python -m clipscale` run there (not under srun) stays world size 1.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return LaunchEnv(rank=int(env.get("RANK", "0")), world_size=int(env.get("WORLD_SIZE", "1")),
                         local_rank=int(env.get("LOCAL_RANK", "0")))
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_NODELIST"]
    addr = env.get("MASTER_ADDR") or first_host(nodelist)
    port = env.get("MASTER_PORT") or slurm_port(int(env["SLURM_JOB_ID"]))
    return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                     local_rank=int(env.get("SLURM_LOCALID", "0")), init_method=f"tcp://{addr}:{port}")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu-[007-009,12],login1' -> 'gpu-007'.

    The same host `scontrol show hostnames NODELIST | head -n1` prints, without needing scontrol.
    """
    m = re.match(r"([^,\[]*)(?:\[([^\]\-,]+))?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"cannot read a host from SLURM nodelist {nodelist!r}; set MASTER_ADDR")
    return m.group(1) + (m.group(2) or "")


def slurm_port(job_id: int) -> int:
    """Rendezvous port of a job: distinct for concurrent jobs, in 20000-29999 (slurm/train.sbatch agrees)."""
    return 20000 + job_id % 10000
