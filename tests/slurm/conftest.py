import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node SLURM cluster (slurmctld, slurmd n1 and n2, munge) for this session."""
    from tests.slurm.cluster import Cluster, Unavailable, ensure_installed

    try:
        ensure_installed()
        cluster = Cluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
    except Unavailable as e:
        pytest.skip(f"SLURM unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
