"""Peak memory and throughput of `clipscale data reshard|validate|make|sizes` as the number of samples grows.

    python -m benchmarks.data_memory --counts 100000 400000 1600000 --bucket-mb 16 \\
        --work /tmp/clipscale-data-memory --out docs/bench/data_memory.json

Inputs per count N (written once into `--work`, fast: tiny pre-encoded images written straight into
tars): shards of `--per-input-shard` samples (~45 MB each, so that every case reads shards larger
than the loader reader's 16 MiB read-ahead, and only their number grows with N), each sample a 1x1 JPEG made unique by a counter after its end marker
(decoders ignore it; dedup sees distinct images) and a short caption; for `make`, the same images
as files in folders of 1,000 with a captions CSV. Each (tool, N) runs in a fresh process with one
worker process (`processes=1`, so every byte is in the measured process): "extra" is its peak RSS
(VmHWM, reset after the imports) above its RSS then (see `benchmarks.memory`). `reshard` writes
`--shards-out` output shards, so that buckets of N / shards samples, the old layout, would be large.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.memory import METHOD_CPU, peak_rss_bytes, reset_peak_rss, rss_bytes, run_isolated
from clipscale.bench import environment, write_json

log = logging.getLogger(__name__)
TOOLS = ("reshard", "validate", "make", "sizes")
FOLDER_FILES = 1000


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (120, 60, 30)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


def member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def write_inputs(work: Path, n: int, *, per_shard: int, images: bool) -> None:
    """`shards/` (N / per_shard tars + sizes.json) and, with `images`, `images/` (folders of 1,000 files) and
    `captions.csv` for N samples."""
    done = work / "inputs.json"
    if done.exists() and (not images or json.loads(done.read_text())["images"]):
        return
    base = tiny_jpeg()
    (work / "shards").mkdir(parents=True, exist_ok=True)
    shards = n // per_shard
    for s in range(shards):
        with open(work / "shards" / f"{s:06d}.tar", "wb") as f:
            for i in range(s * per_shard, (s + 1) * per_shard):
                f.write(member(f"{i:09d}.jpg", base + i.to_bytes(8, "little")) +
                        member(f"{i:09d}.txt", f"caption {i}".encode()))
            f.write(b"\0" * 1024)
    (work / "shards" / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": per_shard for s in range(shards)}))
    if not images:
        done.write_text(json.dumps({"samples": per_shard * shards, "input_shards": shards, "images": False}))
        return
    with open(work / "captions.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["path", "caption"])
        for i in range(per_shard * shards):
            rel = f"{i // FOLDER_FILES:05d}/{i:09d}.jpg"
            if i % FOLDER_FILES == 0:
                (work / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / "images" / rel).write_bytes(base + i.to_bytes(8, "little"))
            table.writerow([rel, f"caption {i}"])
    done.write_text(json.dumps({"samples": per_shard * shards, "input_shards": shards, "images": True}))


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One tool over one input set, in this process: peak RSS above the post-import RSS, and samples/s."""
    from clipscale.data_tools.make import ShardTarget, make_shards
    from clipscale.data_tools.reshard import reshard
    from clipscale.data_tools.shardio import list_shards
    from clipscale.data_tools.sizes import write_sizes
    from clipscale.data_tools.validate import validate_shards

    work = Path(case["work"])
    out = work / f"out-{case['tool']}"
    urls = list_shards(str(work / "shards"))
    run = {
        "reshard": lambda: reshard(urls, str(out), shards=case["shards_out"], bucket_mb=case["bucket_mb"]),
        "validate": lambda: validate_shards(urls),
        "make": lambda: make_shards(str(work / "images"), str(out), target=ShardTarget(samples_per_shard=case["n"] // 4),
                                    captions=str(work / "captions.csv")),
        "sizes": lambda: write_sizes(urls, count=True),
    }[case["tool"]]
    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {**case, "wall_s": round(wall, 1), "samples_per_s": round(case["n"] / wall),
            "baseline_rss_mb": round(baseline / 1e6, 1), "extra_peak_rss_mb": round((peak - baseline) / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_memory", description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--bucket-mb", type=float, default=16.0, help="reshard's bound")
    p.add_argument("--shards-out", type=int, default=4, help="reshard's output shards")
    p.add_argument("--per-input-shard", type=int, default=25_000, help="samples per input shard")
    p.add_argument("--work", help="directory for the inputs and outputs (removed per tool)")
    p.add_argument("--out", help="JSON file to write (rewritten after every case)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in this process
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))  # noqa: T201
        return 0
    if not args.work:
        p.error("--work DIRECTORY is required")
    results: list[dict[str, Any]] = []
    for n in args.counts:
        work = Path(args.work) / f"n{n}"
        start = time.perf_counter()
        write_inputs(work, n, per_shard=args.per_input_shard, images="make" in args.tools)
        log.info("inputs for N=%d ready (%.0f s)", n, time.perf_counter() - start)
        for tool in args.tools:
            os.system(f"rm -rf '{work}/out-{tool}'")  # noqa: S605 - a fresh output directory per case
            case = {"tool": tool, "n": n, "work": str(work), "bucket_mb": args.bucket_mb, "shards_out": args.shards_out,
                    "input_shards": n // args.per_input_shard}
            results.append(run_isolated("benchmarks.data_memory", case, timeout_s=7200))
            log.info("%s", results[-1])
            os.system(f"rm -rf '{work}/out-{tool}'")  # noqa: S605
            if args.out:
                write_json(args.out, {"benchmark": "data_memory", "method": METHOD_CPU, "environment": environment(),
                                      "results": results})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raise SystemExit(main())
