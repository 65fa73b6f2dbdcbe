import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, str]:
    """A small synthetic dataset shared by the integration tests (generated once per session)."""
    from clipscale.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, train_samples=2_048, samples_per_shard=256, zeroshot_samples=300, seed=0)
