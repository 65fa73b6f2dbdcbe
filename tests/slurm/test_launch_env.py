"""Where a process sits according to its launcher: torchrun's variables or an srun job step's."""
import pytest

from clipscale.launch import LaunchEnv, first_host, launch_env, slurm_port


@pytest.mark.parametrize("nodelist, host", [
    ("n1", "n1"),
    ("n[1-2]", "n1"),
    ("gpu-[007-009,12],login1", "gpu-007"),
    ("a01,b[3-4]", "a01"),
    ("[5-6]", "5"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_rejects_an_empty_nodelist():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        first_host("")


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"}
    assert launch_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1, init_method="env://")


def test_srun_task_is_a_rank():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-09]", "SLURM_JOB_ID": "123456"}
    assert launch_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1,
                                        init_method=f"tcp://gpu07:{slurm_port(123456)}")
    assert launch_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}).init_method == "tcp://head:29400"


def test_batch_shell_without_srun_is_one_process():
    # The batch script's own shell has SLURM_PROCID and SLURM_NTASKS of the job, but no step.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"}
    assert launch_env(env) == LaunchEnv()


def test_slurm_port_is_stable_and_in_range():
    ports = {slurm_port(j) for j in range(100_000, 100_050)}
    assert len(ports) == 50 and all(20000 <= p < 30000 for p in ports)
