import dataclasses
import json
import pickle
import random

import numpy as np
import pytest
import torch

from clipscale import checkpoint as ckpt
from clipscale.config import ModelConfig, OptimConfig, load_config
from clipscale.errors import InputError
from clipscale.models import build_model
from clipscale.optim import build_optimizer
from tests.helpers import REPO


def trained_pair(seed):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(vision_width=32, text_width=32, embed_dim=16)).model
    opt = build_optimizer(model, OptimConfig())
    out = model(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 32)))
    (out["logit_scale"] * out["image_features"] @ out["text_features"].T).sum().backward()
    opt.step()
    return model, opt


@dataclasses.dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0


def checkpointer(ckpt_dir, model, opt, progress, *, keep_last=0, keep_every_samples=0, async_periodic=False):
    states = {"model": ckpt.ModelState(model), "optim": ckpt.OptimizerState(model, opt),
              "progress": ckpt.PlainState(lambda: dataclasses.asdict(progress), lambda d: vars(progress).update(d))}
    return ckpt.Checkpointer(ckpt_dir, states=states, meta={"config": {"note": "test"}}, async_periodic=async_periodic,
                             policy=ckpt.RetentionPolicy(keep_last=keep_last, keep_every_samples=keep_every_samples))


def save_steps(ckpt_dir, steps, *, batch=10, **kwargs):
    model, opt = trained_pair(0)
    progress = Progress()
    saver = checkpointer(ckpt_dir, model, opt, progress, **kwargs)
    for step in steps:
        progress.step, progress.samples_seen = step, step * batch
        saver.save(progress)
    saver.wait()
    return saver


def names(ckpt_dir) -> list[str]:
    return [p.name for p in ckpt.complete_checkpoints(ckpt_dir)]


def test_roundtrip_restores_model_optimizer_progress_and_rng(tmp_path):
    model, opt = trained_pair(0)
    progress = Progress(step=7, samples_seen=70)
    torch.manual_seed(123)
    checkpointer(tmp_path, model, opt, progress).save(progress)
    expected_draw = torch.rand(3)

    other, other_opt = trained_pair(1)
    other_progress = Progress()
    meta = ckpt.choose_checkpoint(tmp_path)
    assert meta["step"] == 7 and meta["samples_seen"] == 70 and meta["config"] == {"note": "test"}
    assert checkpointer(tmp_path, other, other_opt, other_progress).load(meta)  # this rank's RNG states were saved
    assert other_progress == progress
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.rand(3), expected_draw)  # RNG resumes where the save left it


def draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_round_trip_restores_every_stream_as_plain_data():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy caches the second Gaussian of a pair: part of the state
    random.gauss(0, 1)  # so does Python's
    state = json.loads(json.dumps(ckpt.rng_state()))  # plain data: survives JSON
    expected = draws()
    draws()
    ckpt.set_rng_state(state)
    assert draws() == expected


def test_incomplete_checkpoints_are_never_loaded(tmp_path):
    save_steps(tmp_path, [1])
    (tmp_path / "step_000002.tmp").mkdir()  # killed mid-save
    (tmp_path / "step_000003").mkdir()  # no meta.json
    (tmp_path / "step_000004.old").mkdir()  # killed while replacing a checkpoint
    (tmp_path / "step_000004.old" / "meta.json").write_text("{}")
    (tmp_path / "step_000005.pruned").mkdir()  # being deleted by retention
    (tmp_path / "step_000005.pruned" / "meta.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    assert ckpt.choose_checkpoint(tmp_path)["step"] == 1


def test_a_save_removes_what_killed_saves_left(tmp_path):
    """Leftovers of other steps (`.tmp` from a killed save, `.old` from a killed replacement,
    `.pruned` from a killed retention) go."""
    save_steps(tmp_path, [1])
    (tmp_path / "step_000002.tmp").mkdir()
    (tmp_path / "step_000001.old").mkdir()
    (tmp_path / "step_000000.pruned").mkdir()
    save_steps(tmp_path, [3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000003"]


def test_saving_a_step_again_replaces_it(tmp_path):
    save_steps(tmp_path, [1, 2])
    save_steps(tmp_path, [2], batch=11)  # e.g. resumed from step 1 on another batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]
    assert ckpt.read_meta(tmp_path / "step_000002")["samples_seen"] == 22


def test_retention_keeps_last_k(tmp_path):
    save_steps(tmp_path, range(1, 5), keep_last=2)
    assert names(tmp_path) == ["step_000003", "step_000004"]
    assert json.loads((tmp_path / "step_000004" / "meta.json").read_text())["step"] == 4


def test_retention_also_keeps_every_nth_sample_count(tmp_path):
    save_steps(tmp_path, range(1, 7), keep_last=1, keep_every_samples=20)
    assert names(tmp_path) == ["step_000002", "step_000004", "step_000006"]


def saved(batch: int, steps) -> list[ckpt.Saved]:
    return [ckpt.Saved(s, s * batch) for s in steps]


def test_to_delete_keeps_the_first_checkpoint_at_or_after_each_interval_with_non_multiple_batches():
    """Batch 30, interval 100: checkpoints at 30, 60, ... the first past 100, 200, 300 are 120, 210, 300."""
    policy = ckpt.RetentionPolicy(keep_last=1, keep_every_samples=100)
    gone = ckpt.to_delete(saved(30, range(1, 12)), policy)
    kept = sorted(set(saved(30, range(1, 12))) - set(gone), key=lambda c: c.step)
    assert [c.samples_seen for c in kept] == [120, 210, 300, 330]


def test_to_delete_is_stable_as_checkpoints_come_one_by_one():
    """Pruned after every save, the survivors are those of pruning all at once."""
    policy = ckpt.RetentionPolicy(keep_last=2, keep_every_samples=100)
    on_disk: list[ckpt.Saved] = []
    for c in saved(30, range(1, 30)):
        on_disk.append(c)
        on_disk = [k for k in on_disk if k not in ckpt.to_delete(on_disk, policy)]
    everything = saved(30, range(1, 30))
    assert on_disk == [c for c in everything if c not in ckpt.to_delete(everything, policy)]


def test_to_delete_keeps_all_without_keep_last():
    assert ckpt.to_delete(saved(30, range(1, 5)), ckpt.RetentionPolicy(keep_every_samples=100)) == []


def test_retention_keeps_each_epoch_of_the_laion400m_recipe():
    """vit_b32_laion400m: batch 32,768 and a checkpoint each 407M-sample epoch, neither a multiple of
    the other. With keep_last=1 and keep_every_samples = one epoch, every epoch's checkpoint stays."""
    t = load_config(REPO / "recipes" / "vit_b32_laion400m.toml").train
    batch, every = t.global_batch_size, t.checkpoint_every_samples
    steps = [s for s in range(1, 4 * every // batch + 2)
             if s * batch // every > (s - 1) * batch // every]  # the steps the trainer saves at
    kept = set(saved(batch, steps)) - set(ckpt.to_delete(
        saved(batch, steps), ckpt.RetentionPolicy(keep_last=1, keep_every_samples=every)))
    assert len(steps) == 4 and len(kept) == 4


def test_emergency_saves_never_prune(tmp_path):
    """A non-finite stop or a preemption keeps the checkpoints before it: they may be the last good weights."""
    model, opt = trained_pair(0)
    progress = Progress(step=1, samples_seen=10)
    saver = checkpointer(tmp_path, model, opt, progress, keep_last=1)
    saver.save(progress)
    progress.step, progress.samples_seen = 2, 20
    saver.save(progress, emergency=True)
    assert names(tmp_path) == ["step_000001", "step_000002"]
    progress.step, progress.samples_seen = 3, 30
    saver.save(progress)  # an ordinary save applies the policy again
    assert names(tmp_path) == ["step_000003"]


def test_async_save_keeps_the_state_of_its_step_and_the_next_save_waits_for_it(tmp_path):
    model, opt = trained_pair(0)
    progress = Progress(step=1, samples_seen=10)
    saver = checkpointer(tmp_path, model, opt, progress, async_periodic=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    saver.save(progress)
    with torch.no_grad():
        for p in model.parameters():  # the next step changes the weights while the save writes
            p.add_(1.0)
    progress.step, progress.samples_seen = 2, 20
    saver.save(progress, emergency=True)  # synchronous: completes the pending save first
    assert names(tmp_path) == ["step_000001", "step_000002"]
    fresh, _ = trained_pair(5)
    ckpt.load_model_weights(tmp_path / "step_000001", fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    progress.step, progress.samples_seen = 3, 30
    saver.save(progress)
    saver.wait()  # what the trainer does before it reports the run done
    assert names(tmp_path) == ["step_000001", "step_000002", "step_000003"]


def test_model_weights_load_into_a_fresh_model(tmp_path):
    model, opt = trained_pair(0)
    progress = Progress(step=1, samples_seen=1)
    checkpointer(tmp_path, model, opt, progress).save(progress)
    fresh, _ = trained_pair(5)
    ckpt.load_model_weights(tmp_path / "step_000001", fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


class CreatesAFile:
    """Unpickling this object calls open(path, "w"): what a hostile file on a shared disk could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def tamper(checkpoint, marker) -> None:
    """Plant a DCP `.metadata` whose unpickling would create `marker`."""
    (checkpoint / ".metadata").write_bytes(pickle.dumps(CreatesAFile(marker)))


def test_a_checkpoint_with_a_pickle_is_refused_without_running_it(tmp_path):
    save_steps(tmp_path / "ckpts", [1])
    marker = tmp_path / "code_ran"
    tamper(tmp_path / "ckpts" / "step_000001", marker)
    fresh, opt = trained_pair(5)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: a clipscale checkpoint holds only") as e:
        checkpointer(tmp_path / "ckpts", fresh, opt, Progress()).load(ckpt.choose_checkpoint(tmp_path / "ckpts"))
    assert isinstance(e.value, InputError)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model_weights(tmp_path / "ckpts" / "step_000001", fresh)
    with pytest.raises(ckpt.CheckpointError):  # still there under its name: refused, not taken for pruned
        ckpt.load_weights_if_present(tmp_path / "ckpts" / "step_000001", fresh)
    assert not marker.exists()
