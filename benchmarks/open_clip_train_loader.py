"""open_clip_train's own training data pipeline (`open_clip_train.data.get_wds_dataset`), timed.

Run by `benchmarks.loader` in a subprocess whose PYTHONPATH puts webdataset 0.2.86 first (the
version open_clip_train works with; clipscale's environment keeps its own webdataset):

    PYTHONPATH=DIR python -m benchmarks.open_clip_train_loader --case '{"shards": ..., ...}'

Prints one JSON line: samples/s after a warm-up of one batch per worker, and the versions used.
Imports nothing from clipscale's data path, which needs the newer webdataset.
"""
from __future__ import annotations

import argparse
import itertools
import json
from typing import Iterator


def run(case: dict) -> dict:
    """Time `get_wds_dataset` as open_clip_train's training calls it (ViT-B-32 train transform and tokenizer)."""
    import open_clip
    import webdataset
    from open_clip_train import data

    from clipscale.bench import time_batches

    args = argparse.Namespace(
        train_data=case["shards"], val_data=None, train_num_samples=case["num_samples"], dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=case["batch"], workers=case["workers"], world_size=1)
    preprocess = open_clip.image_transform(case["image_size"], is_train=True)
    info = data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    figures = time_batches(epochs(info), warmup=case["workers"], samples=case["samples"])
    return {**figures, "samples_per_s_per_core": figures["samples_per_s"] / case["workers"],
            "webdataset": webdataset.__version__, "open_clip": open_clip.__version__, "module": data.__file__}


def epochs(info) -> Iterator[int]:
    """Batch sizes over successive epochs, as open_clip_train's training loop iterates them."""
    for epoch in itertools.count():
        info.set_epoch(epoch)
        for images, _ in info.dataloader:
            yield images.shape[0]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.open_clip_train_loader", description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True, help="JSON: shards, num_samples, batch, workers, samples, image_size")
    print(json.dumps(run(json.loads(p.parse_args().case))), flush=True)  # noqa: T201  (read by the parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
