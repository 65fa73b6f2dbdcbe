"""Loader start-up and checkpoint state at LAION scale: 10^5 shards dealt to 1,000 logical streams.

    python -m benchmarks.loader_state --shards 100000 --streams 1000 --world 100 --out docs/bench/loader_state.json

Per rank, building the loader (`build_train_loader`: shard spec expansion, sizes.json, layout checks,
the stream plan) and the first epoch's assignment of shards to streams (`StreamPlan.deal(0)`, which
every rank computes whole), timed (median of `--repeats`); then the size of what the loader hands
to each DataLoader worker (the pickled plan) and of the whole job's loader state as a checkpoint's
meta.json holds it (JSON), with every stream's counters filled as after a long run. Only sizes.json
and the first shard exist: nothing here reads shards.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

from clipscale.bench import environment, write_json
from clipscale.data.config import DataConfig
from clipscale.data.pipeline import build_train_loader, merge_rank_states

LONG_RUN_COUNTERS = {"samples": 12_345_678_901, "corrupt_image": 123_456, "missing_caption": 65_432,
                     "decompression_bomb": 12, "epoch_overrun": 4_321, "truncated_shard": 7, "unreadable_shard": 3}


def write_spec(directory: Path, shards: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(directory / "000000.tar", "w"):
        pass
    (directory / "sizes.json").write_text(json.dumps({f"{i:06d}.tar": 10_000 + i % 977 for i in range(shards)}))
    return f"{directory}/{{000000..{shards - 1:06d}}}.tar"


def measure(spec: str, *, streams: int, world: int, repeats: int) -> dict[str, Any]:
    cfg = DataConfig(train_shards=spec, num_streams=streams, workers=streams // world)
    build, deal = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        loader = build_train_loader(cfg, tokenizer=lambda texts: texts, image_size=224, batch_size=32 * streams // world,
                                    rank=0, world_size=world, seed=0)
        middle = time.perf_counter()
        loader.plan.deal(0)
        loader.plan.quota(0)
        deal.append(time.perf_counter() - middle)
        build.append(middle - start)
    states = []
    for rank in range(world):  # each rank's view after a long run: its own streams' counters filled
        state = loader.state_dict()
        for s in range(rank * streams // world, (rank + 1) * streams // world):
            counters = {k: v for k, v in LONG_RUN_COUNTERS.items() if k not in ("truncated_shard", "unreadable_shard")}
            state["streams"][s] = {"epoch": 3, "taken": 987_654, "list_epoch": 4, "block": 25, "offset": 8_765,
                                   "consumed": counters, "read": {"truncated_shard": 7, "unreadable_shard": 3},
                                   "totals": LONG_RUN_COUNTERS}
        states.append(state)
    merged = merge_rank_states(states)
    return {"shards": len(loader.plan.urls), "streams": streams, "world": world, "repeats": repeats,
            "build_loader_s": round(statistics.median(build), 3), "first_epoch_deal_s": round(statistics.median(deal), 3),
            "plan_pickle_bytes_per_worker": len(pickle.dumps(loader.plan)),
            "checkpoint_loader_state_json_bytes": len(json.dumps(merged)),
            "per_stream_state_json_bytes": round(len(json.dumps(merged)) / streams)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader_state", description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--streams", type=int, default=1_000)
    p.add_argument("--world", type=int, default=100, help="ranks (streams / world = DataLoader workers per rank)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="/tmp/clipscale-loader-state", help="where sizes.json and the first shard go")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    spec = write_spec(Path(args.work), args.shards)
    result = measure(spec, streams=args.streams, world=args.world, repeats=args.repeats)
    print(json.dumps(result))  # noqa: T201
    if args.out:
        write_json(args.out, {"benchmark": "loader_state", "environment": environment(), "result": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
