"""The single-GPU benchmark run by `benchmarks/gpu.sh`: every case as a subprocess of a documented
entry point, each writing its JSON into `--out`, and `summary.json` with the headline figures.

    python -m benchmarks.gpu --out bench_out/gpu                           # one H100/H200: < 8 minutes
    python -m benchmarks.gpu --profile tiny --device cpu --out /tmp/gpu    # the same cases at toy sizes

Cases: ViT-B/16 step time and MFU (`clipscale bench step`, bf16, DDP and FSDP2, activation
checkpointing off and on, one process under torchrun); gradient-cache time ratio with 8 chunks
(`benchmarks.gradcache`, a ViT-B/16-sized open_clip CLIP in fp32); tiled vs dense loss at 32k and
64k (`benchmarks.loss`); loader samples/s on generated uniform shards with CPU decode and with
`data.decode_device=cuda` (`clipscale bench loader`), recorded as unavailable where clipscale or the
machine lacks it. A case that fails is recorded with its error and the run goes on; cases that would
start after `--budget-s` are recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import REPO
from clipscale.bench import environment, write_json

log = logging.getLogger(__name__)
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {
        "step": ["recipes/vit_b16_gpu.toml", "train.global_batch_size=256"],
        "step_options": ["--steps", "20", "--warmup", "5"],
        "gradcache": ["--width", "768", "--layers", "12", "--head-width", "64", "--embed-dim", "512",
                      "--image-size", "224", "--patch-size", "16", "--context-length", "77",
                      "--chunk-size", "32", "--time-batch", "256", "--batches", "32", "256", "--steps", "3"],
        "loss": ["--batches", "32768", "65536", "--dense-max-batch", "65536", "--dim", "512", "--repeats", "3"],
        "shards": ["--set", "uniform", "--shards", "8", "--per-shard", "256"],
        "loader": ["--workers", "8", "--batch", "256", "--samples", "4096", "--repeats", "1"],
    },
    "tiny": {
        "step": ["recipes/vit_b16_gpu.toml", "model.name=clipscale-tiny", "train.global_batch_size=4"],
        "step_options": ["--steps", "1", "--warmup", "1"],
        "gradcache": ["--width", "32", "--layers", "1", "--head-width", "16", "--embed-dim", "16",
                      "--image-size", "16", "--patch-size", "8", "--context-length", "8",
                      "--chunk-size", "2", "--time-batch", "16", "--batches", "2", "16", "--steps", "1"],
        "loss": ["--batches", "64", "128", "--dense-max-batch", "128", "--dim", "16", "--tile-size", "32",
                 "--repeats", "1"],
        "shards": ["--set", "uniform", "--shards", "1", "--per-shard", "8"],
        "loader": ["--workers", "1", "--batch", "4", "--samples", "8", "--repeats", "1"],
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu", help="sizes: gpu (ViT-B/16) or tiny")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the cases without a GPU")
    p.add_argument("--budget-s", type=float, default=450, help="start no case after this many seconds")
    p.add_argument("--out", required=True, help="directory for every case's JSON and summary.json")
    return p.parse_args(argv)


def cases(profile: dict[str, Any], *, device: str, out: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of every case, in run order; the loader cases get the shard spec at run time."""
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    step = [(f"step_{parallel}_ckpt_{'on' if ckpt else 'off'}",
             [*torchrun, "-m", "clipscale", "bench", "step", *profile["step"], "train.precision=bf16",
              f"train.parallel={parallel}", f"train.grad_checkpointing={str(ckpt).lower()}", f"run.device={device}",
              *profile["step_options"], "--out", str(out / f"step_{parallel}_ckpt_{'on' if ckpt else 'off'}.json")])
            for parallel in ("ddp", "fsdp") for ckpt in (False, True)]
    loader = [py, "-m", "clipscale", "bench", "loader", *profile["loader"], "--device", device]
    return [*step,
            ("gradcache", [py, "-m", "benchmarks.gradcache", *profile["gradcache"], "--device", device,
                           "--out", str(out / "gradcache.json")]),
            ("loss", [py, "-m", "benchmarks.loss", *profile["loss"], "--device", device,
                      "--out", str(out / "loss.json")]),
            ("shards", [py, "-m", "benchmarks.shards", *profile["shards"], "--out", str(out / "shards")]),
            ("loader_cpu_decode", [*loader, "--out", str(out / "loader_cpu_decode.json")]),
            ("loader_gpu_decode", [*loader, "data.decode_device=cuda", "--out", str(out / "loader_gpu_decode.json")])]


def run_case(argv: list[str], *, timeout_s: float) -> dict[str, Any]:
    """Run one case in its own process group (torchrun's workers included) and kill the group on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout_s:.0f} s (--budget-s)"
    record = {"command": " ".join(argv), "returncode": proc.returncode, "seconds": time.perf_counter() - start}
    if proc.returncode != 0:
        record["error"] = stderr.strip()[-3000:]
    return {**record, "stdout": stdout.strip()[-2000:]}


def headline(name: str, path: Path) -> dict[str, Any]:
    """The figures summary.json quotes from a case's JSON."""
    result = json.loads(path.read_text())
    if name.startswith("step_"):
        keys = ("device", "world_size", "global_batch_size", "samples_per_s", "model_tflops_per_s_per_device",
                "mfu", "peak_memory_gb")
        return {**{k: result[k] for k in keys}, "step_time_s": result["global_batch_size"] / result["samples_per_s"]}
    if name == "gradcache":
        return {k: result["timing"][k] for k in ("batch", "chunk_size", "plain_s", "gradcache_s",
                                                 "ratio_gradcache_over_plain", "ideal_ratio")}
    if name == "loss":
        return {"summary": result["summary"], "errors": [r for r in result["results"] if "error" in r]}
    return result["summary"]  # loader


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, records, spec = time.perf_counter(), {}, None
    for name, case in cases(PROFILES[args.profile], device=args.device, out=out):
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
            records[name] = {"skipped": f"--budget-s {args.budget_s:.0f} spent"}
            continue
        if name.startswith("loader"):
            if spec is None:
                records[name] = {"skipped": "no shards (the shards case failed)"}
                continue
            case = [*case, "--shards", spec]
        log.info("[%s] %s", name, " ".join(case))
        record = run_case(case, timeout_s=left)
        if name == "shards" and "error" not in record:
            spec = record["stdout"].splitlines()[-1]
        elif name == "loader_gpu_decode" and "error" in record:
            record["unavailable"] = record.pop("error")  # no data.decode_device switch, or no CUDA
        elif "error" not in record and name != "shards":
            record["result"] = headline(name, out / f"{name}.json")
        records[name] = record
        log.info("[%s] %.0f s: %s", name, record["seconds"], "failed" if "error" in record else "done")
    payload = {"benchmark": "gpu", "profile": args.profile, "device": args.device, "environment": environment(),
               "seconds": time.perf_counter() - start, "cases": records}
    write_json(str(out / "summary.json"), payload)
    outcome = {k: r.get("result") or r.get("unavailable") or r.get("error") or r.get("skipped") or "done"
               for k, r in records.items()}
    print(json.dumps(outcome, indent=2))  # noqa: T201  (CLI output)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    raise SystemExit(main())
