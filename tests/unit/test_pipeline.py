"""The streaming loader: exact epochs, uneven shards, exact resume, determinism, world-size invariance."""
import dataclasses
import warnings

import numpy as np
import open_clip
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipscale.data import pipeline
from clipscale.data.config import DataConfig
from clipscale.data.pipeline import (POOL_SLOTS, TrainLoader, build_train_loader, merge_rank_states,
                                    normalize_images, sum_counters)
from clipscale.data.shards import DataError
from clipscale.data.streams import StreamPlan
from tests.shard_kit import write_dataset

UNEVEN = [5, 40, 13, 27, 60, 8, 33, 21]
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_loader(spec, *, batch=8, rank=0, world=1, seed=0, device=torch.device("cpu"), **data):
    cfg = DataConfig(train_shards=spec, **{"num_streams": 4, "workers": 0, "shuffle_buffer": 16, **data})
    return build_train_loader(cfg, tokenizer=TOKENIZER, image_size=16, batch_size=batch // world,
                              rank=rank, world_size=world, seed=seed, device=device)


def take(loader, steps):
    it = iter(loader)
    return [next(it) for _ in range(steps)]


def keys(batches):
    return [b.keys for b in batches]


def host_images(batch):
    """(B, 3, H, W) uint8 of a batch, joined on the host."""
    return batch.images_on(torch.device("cpu"))


def counters(loader):
    """Sample counters (good `samples` and bad ones per reason) of the loader's own streams."""
    return sum_counters(loader.totals[s] for s in loader.streams if s in loader.totals)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("uneven"), UNEVEN)


def test_every_epoch_deals_each_shard_once_and_balances_sizes():
    sizes = list(np.random.default_rng(0).integers(1, 100, 50))
    plan = StreamPlan([str(i) for i in range(50)], sizes=sizes, weights=[1.0] * 50,
                      cfg=DataConfig(num_streams=4), sub_batch=2, seed=0)
    for epoch in range(3):
        lists, loads = plan.deal(epoch)
        assert sorted(i for shards in lists for i in shards) == list(range(50))
        assert loads == [sum(sizes[i] for i in shards) for shards in lists]
        assert max(loads) - min(loads) <= max(sizes)
    assert plan.deal(0)[0] != plan.deal(1)[0]


def test_resampled_blocks_follow_the_source_weights():
    urls = [f"a{i}" for i in range(2)] + [f"b{i}" for i in range(3)]
    weights = [1.0] * 2 + [3.0] * 3
    plan = StreamPlan(urls, sizes=[1] * 5, weights=weights, cfg=DataConfig(num_streams=4, resampled=True,
                      block_shards=4), sub_batch=2, seed=0)
    drawn = [u for b in range(500) for u in plan.block(b % 4, epoch=0, block=b)]
    frac_b = sum(u.startswith("b") for u in drawn) / len(drawn)
    assert abs(frac_b - 9 / 11) < 0.03  # 2000 draws: the standard error is 0.009
    assert plan.quota(0) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epochs_never_repeat_a_sample_with_uneven_shards(uneven, workers):
    loader = make_loader(uneven, workers=workers, block_shards=1)
    quota = loader.plan.quota(0)
    steps = quota * 4 // 8
    batches = take(loader, 2 * steps)
    assert all(len(b.keys) == 8 for b in batches)
    for epoch in (batches[:steps], batches[steps:]):
        seen = [k for b in epoch for k in b.keys]
        assert len(seen) == len(set(seen)) == quota * 4
    assert counters(loader) == {"samples": 2 * steps * 8}


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_from_any_step_continues_exactly(uneven, resampled):
    full = take(make_loader(uneven, resampled=resampled, block_shards=1), 30)
    for k in (1, 7, 18):
        first = make_loader(uneven, resampled=resampled, block_shards=1)
        head = take(first, k)
        resumed = make_loader(uneven, resampled=resampled, block_shards=1)
        resumed.load_state_dict(first.state_dict())
        tail = take(resumed, 30 - k)
        assert keys(head + tail) == keys(full)
        assert torch.equal(host_images(tail[0]), host_images(full[k])) and torch.equal(tail[-1].texts, full[-1].texts)


def test_two_runs_are_identical_and_the_seed_matters(uneven):
    a, b = take(make_loader(uneven, workers=2), 6), take(make_loader(uneven, workers=2), 6)
    assert keys(a) == keys(b) and all(torch.equal(host_images(x), host_images(y)) for x, y in zip(a, b))
    assert keys(take(make_loader(uneven, seed=1), 6)) != keys(a)


def test_worker_image_buffers_are_reused_only_once_the_consumer_dropped_them(uneven, monkeypatch):
    lent = []  # the loader watches each sub-batch that arrives in a pooled buffer, to hand its slot back

    class CountedRef(pipeline.StorageWeakRef):
        def __init__(self, storage):
            super().__init__(storage)
            lent.append(1)

    monkeypatch.setattr(pipeline, "StorageWeakRef", CountedRef)
    steps = 4 * POOL_SLOTS
    want = take(make_loader(uneven), steps)  # in one process: plain tensors
    keeper = make_loader(uneven, workers=2)
    held = take(keeper, steps)  # every batch kept alive: no buffer may be reused under it
    assert all(torch.equal(host_images(h), host_images(w)) for h, w in zip(held, want))
    assert len(lent) < 4 * steps  # some sub-batches came in one-off buffers
    lent.clear()
    streamed = make_loader(uneven, workers=2)
    for ref, batch in zip(want, streamed):  # each batch dropped when the next one is asked for
        assert torch.equal(host_images(batch), host_images(ref))
    assert len(lent) == 4 * steps  # every one pooled


def test_batches_do_not_depend_on_world_size_and_resume_across_it(uneven):
    single = take(make_loader(uneven), 10)
    ranks = [make_loader(uneven, rank=r, world=2) for r in range(2)]
    per_rank = [take(r, 4) for r in ranks]
    assert [k0 + k1 for k0, k1 in zip(*map(keys, per_rank))] == keys(single[:4])
    resumed = make_loader(uneven)
    resumed.load_state_dict(merge_rank_states([r.state_dict() for r in ranks]))
    assert keys(take(resumed, 6)) == keys(single[4:])


def test_bad_layouts_and_specs_name_the_fix(uneven, tmp_path):
    with pytest.raises(DataError, match="data.num_streams=3 must be a multiple"):
        make_loader(uneven, world=2, num_streams=3)
    with pytest.raises(DataError, match="must be a multiple of data.num_streams"):
        make_loader(uneven, batch=6)
    with pytest.raises(DataError, match="train_weights needs data.resampled"):
        make_loader(f"{uneven}::{uneven}", train_weights=(1.0, 2.0))
    with pytest.raises(DataError, match="one non-negative weight per"):
        make_loader(f"{uneven}::{uneven}", train_weights=(1.0,), resampled=True)
    unsized = write_dataset(tmp_path / "unsized", [4] * 4, with_sizes=False)
    with pytest.raises(DataError, match="set data.train_num_samples"):
        make_loader(unsized)
    assert len(take(make_loader(unsized, train_num_samples=16), 2)[1].keys) == 8


def test_state_from_another_stream_layout_is_refused(uneven):
    state = make_loader(uneven).state_dict()
    with pytest.raises(DataError, match="num_streams"):
        make_loader(uneven, num_streams=8).load_state_dict(state)
    with pytest.raises(DataError, match="resampled"):
        make_loader(uneven, resampled=True).load_state_dict(state)


def test_fsspec_urls_info_json_sizes_and_json_captions(tmp_path):
    import json

    from tests.shard_kit import image_bytes, write_shard

    for i in range(4):
        write_shard(tmp_path / f"{i}.tar", [m for j in range(3) for m in (
            (f"k{i}{j}.jpg", image_bytes(j)), (f"k{i}{j}.json", json.dumps({"caption": f"cap {i}{j}"}).encode()))])
    (tmp_path / "_info.json").write_text(json.dumps(
        {"shardlist": [{"url": f"{i}.tar", "nsamples": 3} for i in range(4)]}))
    loader = make_loader(f"file://{tmp_path}/{{0..3}}.tar", caption_key="json:caption", batch=4)
    assert loader.plan.quota(0) == 3  # each stream holds one shard of 3 samples (from _info.json)
    batches = take(loader, 3)
    seen = [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(f"k{i}{j}" for i in range(4) for j in range(3))
    assert counters(loader) == {"samples": 12}
    i = seen.index("k00")
    assert torch.equal(batches[i // 4].texts[i % 4], TOKENIZER(["cap 00"])[0])


def test_a_wrong_spec_fails_at_once_and_a_missing_shard_counts_when_read(tmp_path):
    spec = write_dataset(tmp_path / "d", [4] * 4)
    with pytest.raises(DataError, match=r"do not exist: the first shard of a `::` source, .*/nowhere/000000.tar"):
        make_loader(f"{spec}::{tmp_path}/nowhere/{{000000..000003}}.tar", train_weights=(1.0, 1.0), resampled=True)
    (tmp_path / "d" / "000002.tar").unlink()  # not the first: found when a stream reads it
    loader = make_loader(spec, shuffle_buffer=0)
    seen = [k for batch in take(loader, 2) for k in batch.keys]
    assert len(seen) == 16 and not any(k.startswith("s02_") for k in seen)
    assert counters(loader)["unreadable_shard"] >= 1 and counters(loader)["samples"] == 16


def test_batches_for_the_cpu_stay_in_ordinary_memory(uneven):
    batch = take(make_loader(uneven, workers=2), 1)[0]
    assert not batch.texts.is_pinned() and not any(part.is_pinned() for part in batch.image_parts)


@CUDA
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_for_a_cuda_device_arrive_pinned_and_unchanged(uneven, workers):
    cuda = torch.device("cuda")
    want = take(make_loader(uneven, workers=workers), 2 * POOL_SLOTS)
    got = make_loader(uneven, workers=workers, device=cuda)
    for ref, batch in zip(want, got):
        assert batch.texts.is_pinned() and all(part.is_pinned() for part in batch.image_parts)
        assert torch.equal(batch.images_on(cuda).cpu(), host_images(ref)) and torch.equal(batch.texts, ref.texts)
        assert batch.keys == ref.keys


def test_gpu_decode_is_refused_without_a_cuda_training_device(uneven):
    with pytest.raises(DataError, match=r"data.decode_device='cuda' decodes JPEGs on the training device, but "
                                        r"this run trains on cpu .*; set data.decode_device='cpu'"):
        make_loader(uneven, decode_device="cuda")
    with pytest.raises(DataError, match=r"data.decode_device='gpu' must be 'cpu' or 'cuda'"):
        make_loader(uneven, decode_device="gpu")


@pytest.mark.parametrize("workers", [0, 2])
def test_jpegs_handed_to_the_device_give_the_cpu_paths_batches(uneven, workers):
    """The worker/trainer hand-off of data.decode_device="cuda", with the device decode run on the CPU."""
    want = take(make_loader(uneven, workers=workers), 5)
    plan = make_loader(uneven, workers=workers).plan
    cfg = DataConfig(train_shards=uneven, num_streams=4, workers=workers, shuffle_buffer=16, decode_device="cuda")
    handed = TrainLoader(plan, cfg, tokenizer=TOKENIZER, image_size=16, rank=0, world_size=1)
    for ref, batch in zip(want, handed):
        assert len(batch.jpegs) == 8 and not any(part.any() for part in batch.image_parts)  # all left to the device
        assert batch.keys == ref.keys and torch.equal(host_images(batch), host_images(ref))


@CUDA
def test_gpu_decoded_batches_match_the_cpu_loader(uneven):
    cuda = torch.device("cuda")
    want = take(make_loader(uneven, workers=2), 4)
    got = make_loader(uneven, workers=2, device=cuda, decode_device="cuda")
    for ref, batch in zip(want, got):
        images = batch.images_on(cuda)
        assert images.device.type == "cuda" and batch.keys == ref.keys
        assert (images.cpu().int() - host_images(ref).int()).abs().float().mean() < 2  # nvJPEG vs libjpeg-turbo


class CountOps(TorchDispatchMode):
    """Records the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_normalize_images_builds_its_constants_once():
    """Each step normalises a batch; a mean/std tensor made from a Python list per call would be a
    blocking host-to-device copy per step on a GPU. Only the arithmetic remains after the first call."""
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    first = normalize_images(images, mean=mean, std=std)
    with CountOps() as counter:
        again = normalize_images(images, mean=list(mean), std=list(std))
    assert torch.equal(first, again)
    # images.float() is the one copy; no tensor is made from the lists (lift_fresh) nor scaled again
    assert sorted(str(op) for op in counter.ops) == ["aten._to_copy.default", "aten.div.Tensor", "aten.sub.Tensor"]
    reference = (images.float() - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    assert torch.equal(again, reference)


def test_unset_num_streams_follows_the_shards_and_the_launch(tmp_path, caplog):
    from clipscale.data.pipeline import resolve_num_streams

    spec = write_dataset(tmp_path, [13, 12, 12])
    with caplog.at_level("INFO", logger="clipscale.data.pipeline"):
        loader = make_loader(spec, batch=12, num_streams=None)  # 3 shards, fewer than 4
    assert loader.cfg.num_streams == 3 and loader.plan.quota(0) == 12
    assert "data.num_streams=3 (unset by the recipe: it follows 3 shards, world size 1 x 1 workers" in caplog.text
    assert "3 streams x 12 samples = 36 of the 37 samples of 3 shards per epoch; the other 1 are left" in caplog.text

    def streams(*, shards, batch, world, workers=1, **data):
        return resolve_num_streams(DataConfig(workers=workers, **data), num_shards=shards, batch_size=batch // world,
                                   world_size=world)

    assert streams(shards=3, batch=256, world=1) == 2  # 3 streams would not divide the batch
    assert streams(shards=100, batch=256, world=2) == 4
    assert streams(shards=100, batch=256, world=8, workers=2) == 16
    assert streams(shards=1, batch=256, world=1, resampled=True) == 4
    assert streams(shards=3, batch=256, world=2, num_streams=2) == 2  # a recipe's value stands
    with pytest.raises(DataError, match="3 shards, fewer than data.num_streams=4; lower"):
        streams(shards=3, batch=256, world=4)


def test_decoded_images_reach_the_batch_without_a_warning(tmp_path):
    from tests.shard_kit import image_bytes, write_shard

    members = [m for i in range(4) for m in ((f"p{i}.png", image_bytes(i, fmt="PNG")), (f"p{i}.txt", b"a png"))]
    spec = str(write_shard(tmp_path / "png.tar", members))  # PNGs are decoded by PIL, into read-only arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (batch,) = take(make_loader(spec, num_streams=1, batch=4, train_num_samples=4), 1)
    assert host_images(batch).shape == (4, 3, 16, 16)


def test_shuffle_buffer_is_bounded_in_bytes_too():
    import random

    from clipscale.data.streams import shuffled

    rng = random.Random(0)
    samples = [{"__key__": str(i), "image": bytes(rng.choice([10, 1_000, 400_000])), "caption": b"c"}
               for i in range(300)]
    pulled = []

    def source():
        for s in samples:
            pulled.append(s)
            yield s

    out, worst = [], 0
    for s in shuffled(source(), buffer=1_000, max_bytes=1_000_000, rng=random.Random(1)):
        out.append(s)
        held = sum(len(p["image"]) + 1 for p in pulled) - sum(len(o["image"]) + 1 for o in out)
        worst = max(worst, held)  # bytes read but not yet handed on (the one just yielded excluded)
    assert sorted(s["__key__"] for s in out) == sorted(s["__key__"] for s in samples)
    assert [s["__key__"] for s in out] != [s["__key__"] for s in samples]
    assert worst <= 1_000_000 + 400_001  # the buffer's bound, plus the sample just read; without the bound
    # the buffer would hold all 300 samples (~40 MB)
    same = list(shuffled(iter(samples), buffer=16, max_bytes=10**12, rng=random.Random(1)))
    count_only = list(shuffled(iter(samples), buffer=16, max_bytes=10**9, rng=random.Random(1)))
    assert same == count_only  # a bytes bound that never binds changes nothing


def test_shuffle_buffer_mb_must_be_positive():
    from clipscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.shuffle_buffer_mb=0(\.0)? is out of range: it must be > 0"):
        load_config(None, ["data.shuffle_buffer_mb=0"])
