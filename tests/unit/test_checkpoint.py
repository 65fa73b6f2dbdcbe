import json
import random

import numpy as np
import pytest
import torch

from clipscale import checkpoint as ckpt
from clipscale.config import ModelConfig, OptimConfig
from clipscale.models import build_model
from clipscale.optim import build_optimizer


def trained_pair(seed):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vision_width=32, text_width=32, embed_dim=16)).model
    opt = build_optimizer(model, OptimConfig())
    out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 32)))
    (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = trained_pair(0)
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=7, meta={"samples_seen": 70})
    expected_draw = torch.rand(3)

    other, other_opt = trained_pair(1)
    meta = ckpt.load_checkpoint(path, model=other, optimizer=other_opt)
    assert meta["step"] == 7 and meta["samples_seen"] == 70
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert ckpt.restore_rng(path)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG resumes where the save left it


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_round_trip_restores_every_stream_and_loads_without_unpickling_objects(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy caches the second Gaussian of a pair: part of the state
    (tmp_path / "step_000001").mkdir()
    torch.save(ckpt.rng_state(), tmp_path / "step_000001" / "rng_rank0.pt")
    expected = draws()
    draws()
    assert ckpt.restore_rng(tmp_path / "step_000001")
    assert draws() == expected
    torch.load(tmp_path / "step_000001" / "rng_rank0.pt", weights_only=True)  # plain data only
    assert not ckpt.restore_rng(tmp_path / "missing")  # e.g. a rank that did not exist at save


class CreatesAFile:
    """Unpickling this object calls open(path, "w"): what a hostile file on a shared disk could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_an_rng_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "step_000001").mkdir()
    torch.save({"python": CreatesAFile(marker)}, tmp_path / "step_000001" / "rng_rank0.pt")
    with pytest.raises(RuntimeError, match="rng_rank0.pt is not a clipscale RNG state.*delete it"):
        ckpt.restore_rng(tmp_path / "step_000001")
    assert not marker.exists()


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    model, opt = trained_pair(0)
    ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, meta={"samples_seen": 1})
    (tmp_path / "step_000002.tmp").mkdir()  # killed mid-save
    (tmp_path / "step_000003").mkdir()  # no meta.json
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002.tmp", "step_000003"]


def test_retention_keeps_last_k(tmp_path):
    model, opt = trained_pair(0)
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, meta={"samples_seen": step}, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert json.loads((tmp_path / "step_000004" / "meta.json").read_text())["step"] == 4


def test_model_weights_load_into_a_fresh_model(tmp_path):
    model, opt = trained_pair(0)
    path = ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, meta={"samples_seen": 1})
    fresh, _ = trained_pair(5)
    ckpt.load_model_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_retention_also_keeps_every_nth_sample_count(tmp_path):
    model, opt = trained_pair(0)
    for step in range(1, 7):
        ckpt.save_checkpoint(tmp_path, model=model, optimizer=opt, step=step, meta={"samples_seen": 10 * step},
                             keep_last=1, keep_every_samples=20)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == [
        "step_000002", "step_000004", "step_000006"]
