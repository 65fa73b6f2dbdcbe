"""`clipscale plan`: what a run costs before it starts: compute, steps, per-GPU memory, time.

Memory per GPU, in bytes, from the model itself on the meta device (nothing is allocated):
- weights in fp32 (4 B per parameter), gradients (4 B) and AdamW's two moments (8 B) per trained
  parameter: replicated under DDP, divided by the world size under FSDP2, which also holds two
  blocks' parameters gathered in the compute dtype (the current block and the prefetched one);
- activations: the bytes autograd saves for backward, counted with saved-tensor hooks on a meta
  forward run with the fused attention kernel GPUs use (no T x T attention matrix); with
  activation checkpointing, what is saved outside the transformer blocks, the blocks' inputs and
  one block's activations while it is recomputed. 16-bit autocast halves them (approximately:
  norms and softmax statistics stay in fp32);
- loss: dense logits of this rank's rows against the global batch, in fp32, with the copies the
  loss keeps for backward (measured: 3 for CLIP's two cross-entropies, 2 for SigLIP); tiled, a few
  tiles at a time.
Step time uses model FLOPs (compute.model_flops_per_sample) at the stated MFU (PaLM, App. B).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipscale.compute import hardware_flops_per_sample, model_compute, model_flops_per_sample
from clipscale.config import Config, ConfigError, ModelConfig, resolve_recipe, validate_for_world
from clipscale.data.pipeline import resolve_num_streams
from clipscale.data.shards import DataError, expand_sources
from clipscale.models import create_model, resolve_architecture

GIB = 2**30
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
LOSS_DENSE_COPIES = {"clip": 3, "siglip": 2}
LOSS_TILED_COPIES = 4
GATHERED_BLOCKS = 2  # FSDP2: the block computing and the one prefetched
BLOCK_LISTS = ("resblocks", "blocks")  # open_clip and timm transformer block lists
STATED_GPUS = re.compile(r"^#\s*gpus:\s*([\d,\s]+)$", re.MULTILINE)
# Dense 16-bit tensor-core peak TFLOP/s per GPU (vendors' datasheets, SXM parts), by `run.accelerator`.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}


def stated_gpus(recipe: str | Path) -> list[int]:
    """The GPU counts a recipe states it is meant for, from its `# gpus: 8, 16` comment line."""
    match = STATED_GPUS.search(resolve_recipe(recipe).read_text())
    if match is None:
        raise ConfigError(f"recipe {recipe} states no GPU counts; add a comment line like '# gpus: 8, 16'")
    return [int(n) for n in match.group(1).replace(",", " ").split()]


def peak_tflops_of(cfg: Config, given: float | None) -> tuple[float, str]:
    """(peak TFLOP/s per GPU, where it came from): `given` (--peak-tflops), else the recipe's `run.accelerator`."""
    if given is not None:
        return given, "--peak-tflops"
    accelerator = cfg.run.accelerator
    if accelerator is None:
        raise ConfigError(f"the step time needs the GPU's peak: set run.accelerator (one of {sorted(PEAK_TFLOPS)}) "
                          "or pass --peak-tflops (dense 16-bit TFLOP/s per GPU)")
    if accelerator not in PEAK_TFLOPS:
        raise ConfigError(f"run.accelerator={accelerator!r} has no known peak; choose one of {sorted(PEAK_TFLOPS)} "
                          "or pass --peak-tflops (dense 16-bit TFLOP/s per GPU)")
    return PEAK_TFLOPS[accelerator], f"run.accelerator={accelerator}"


def validate_launch(cfg: Config, world_size: int) -> None:
    """The checks `train` runs before starting `world_size` ranks: config and data layout."""
    validate_for_world(cfg, world_size)
    num_shards = sum(len(urls) for urls in expand_sources(cfg.data.train_shards))
    resolve_num_streams(cfg.data, num_shards=num_shards, batch_size=cfg.train.global_batch_size // world_size,
                        world_size=world_size)


@dataclasses.dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps per sample (fp32), and the parameters of the largest block."""

    outside_blocks: float
    """Saved for backward outside the transformer blocks (embeddings, pooling, projections)."""
    in_blocks: float
    """Saved for backward inside all transformer blocks."""
    block_inputs: float
    """Inputs of all blocks: what activation checkpointing keeps of them."""
    largest_block: float
    """Saved by the largest block: the peak extra while one block is recomputed."""
    largest_block_params: int

    def per_sample(self, *, checkpointing: bool) -> float:
        if checkpointing:
            return self.outside_blocks + self.block_inputs + self.largest_block
        return self.outside_blocks + self.in_blocks


def activation_profile(cfg: ModelConfig) -> ActivationProfile:
    """Activation bytes per sample of `cfg`'s model in training mode (cached per config)."""
    counted = dataclasses.replace(cfg, pretrained=None)
    return _profile(json.dumps(dataclasses.asdict(counted), sort_keys=True))


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as a fused kernel (saving q, k, v, out and row statistics, no T x T matrix), which is what
    GPUs run; on the meta device SDPA would otherwise decompose into the math kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def _attention_as_fused():
    # nn.MultiheadAttention and timm both look F.scaled_dot_product_attention up at call time.
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@functools.lru_cache(maxsize=64)
def _profile(key: str) -> ActivationProfile:
    cfg = ModelConfig(**json.loads(key))
    arch = resolve_architecture(cfg)
    model = create_model(cfg, device="meta").train()
    # Meta storages have no data pointer; _cdata identifies the storage, so views count once.
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[str, int]] = {}  # storage -> (block or "", bytes)
    inputs: dict[str, int] = {}
    current = [""]

    def enter(name):
        def hook(module, args):
            current[0] = name
            inputs[name] = args[0].untyped_storage().nbytes()
        return hook

    blocks = [(f"{n}.{i}", b) for n, m in model.named_modules() if n.endswith(BLOCK_LISTS)
              and isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) for i, b in enumerate(m)]
    for name, block in blocks:
        block.register_forward_pre_hook(enter(name))
        block.register_forward_hook(lambda *_: current.__setitem__(0, ""))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved.setdefault(storage._cdata, (current[0], storage.nbytes()))
        return t

    size = arch["vision_cfg"]["image_size"]
    image = torch.zeros(1, 3, size, size, device="meta")
    text = torch.zeros(1, arch["text_cfg"]["context_length"], dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _attention_as_fused():
        model(image, text)
    per_block: dict[str, int] = {}
    for block, nbytes in saved.values():
        per_block[block] = per_block.get(block, 0) + nbytes
    outside = per_block.pop("", 0)
    return ActivationProfile(
        outside_blocks=outside, in_blocks=sum(per_block.values()), block_inputs=sum(inputs.values()),
        largest_block=max(per_block.values(), default=0),
        largest_block_params=max((sum(p.numel() for p in b.parameters()) for _, b in blocks), default=0),
    )


def memory_per_gpu(cfg: Config, *, world_size: int, parallel: str | None = None,
                   checkpointing: bool | None = None, tiled: bool | None = None,
                   samples: int | None = None) -> dict[str, float]:
    """Estimated bytes per GPU of one training step, by part (see the module docstring).

    Unset keywords take the value of `cfg`; `samples` is the per-rank forward batch (the
    gradient-cache chunk when caching, else the per-rank batch).
    """
    t, loss = cfg.train, cfg.loss
    parallel = parallel or t.parallel
    checkpointing = t.grad_checkpointing if checkpointing is None else checkpointing
    tiled = loss.tiled if tiled is None else tiled
    local_batch = t.global_batch_size // world_size
    samples = samples or min(t.chunk_size or local_batch, local_batch)
    c, profile = model_compute(cfg.model), activation_profile(cfg.model)
    trained = c.params.total - (c.params.image if cfg.model.lock_image else 0)
    shards = world_size if parallel == "fsdp" else 1
    half = t.precision in ("bf16", "fp16")
    rows = local_batch if loss.local_loss else t.global_batch_size
    loss_bytes = (LOSS_TILED_COPIES * loss.tile_size**2 * 4 if tiled
                  else LOSS_DENSE_COPIES[loss.kind] * rows * t.global_batch_size * 4)
    parts = {
        "weights": 4 * c.params.total / shards,
        "gradients": 4 * trained / shards,
        "optimizer": ADAMW_STATE_BYTES * trained / shards,
        "gathered_blocks": (GATHERED_BLOCKS * profile.largest_block_params * (2 if half else 4)
                            if parallel == "fsdp" else 0),
        "activations": samples * profile.per_sample(checkpointing=checkpointing) * (0.5 if half else 1),
        "loss": loss_bytes,
    }
    return {**parts, "total": sum(parts.values())}


def largest_chunk(cfg: Config, *, world_size: int, gpu_mem_bytes: float) -> int:
    """The largest gradient-cache chunk (samples per forward) whose step fits in `gpu_mem_bytes`; 0 if none."""
    fixed = memory_per_gpu(cfg, world_size=world_size, samples=1)
    per_sample = memory_per_gpu(cfg, world_size=world_size, samples=2)["total"] - fixed["total"]
    local_batch = cfg.train.global_batch_size // world_size
    return max(0, min(local_batch, int((gpu_mem_bytes - fixed["total"] + per_sample) // per_sample)))


def plan(cfg: Config, *, gpus: int, gpu_mem_gib: float, peak_tflops: float | None, mfu: float) -> dict[str, Any]:
    """The budget of `cfg` on `gpus` GPUs: compute, steps, memory per GPU (GiB), time at `mfu`.

    The peak is `peak_tflops`, else that of the recipe's `run.accelerator`. Config errors raise; a data layout that does not suit `gpus` is reported in `launch_check`
    (the budget does not depend on it).
    """
    validate_for_world(cfg, gpus)
    peak_tflops, peak_from = peak_tflops_of(cfg, peak_tflops)
    try:
        validate_launch(cfg, gpus)
        launch_check = "ok"
    except DataError as e:
        launch_check = str(e)
    t = cfg.train
    c = model_compute(cfg.model)
    steps = t.total_samples // t.global_batch_size
    samples = steps * t.global_batch_size
    model_flops = model_flops_per_sample(cfg.model)
    step_time_s = model_flops * t.global_batch_size / (gpus * peak_tflops * 1e12 * mfu)
    memory = {}
    for parallel in ("ddp", "fsdp"):
        for ckpt in (False, True):
            parts = memory_per_gpu(cfg, world_size=gpus, parallel=parallel, checkpointing=ckpt)
            memory[f"{parallel}{'_checkpointed' if ckpt else ''}"] = {k: v / GIB for k, v in parts.items()}
    dense, tiled = (memory_per_gpu(cfg, world_size=gpus, tiled=x)["loss"] / GIB for x in (False, True))
    as_configured = memory_per_gpu(cfg, world_size=gpus)["total"] / GIB
    return {
        "model": cfg.model.name, "launch_check": launch_check, "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
        "peak_tflops": peak_tflops, "peak_tflops_from": peak_from, "mfu": mfu,
        **c.to_dict(),
        "model_flops_per_sample": model_flops,
        "hardware_flops_per_sample": hardware_flops_per_sample(cfg.model, t, world_size=gpus),
        "global_batch_size": t.global_batch_size, "per_gpu_batch": t.global_batch_size // gpus,
        "forward_batch_per_gpu": min(t.chunk_size or t.global_batch_size, t.global_batch_size // gpus),
        "steps": steps, "samples_seen": samples,
        "total_model_flops": model_flops * samples,
        "memory_gib": memory, "loss_memory_gib": {"dense": dense, "tiled": tiled},
        "memory_as_configured_gib": as_configured, "fits": as_configured <= gpu_mem_gib,
        "largest_gradcache_chunk": largest_chunk(cfg, world_size=gpus, gpu_mem_bytes=gpu_mem_gib * GIB),
        "step_time_s": step_time_s, "wall_clock_hours": steps * step_time_s / 3600,
        "gpu_hours": steps * step_time_s * gpus / 3600,
    }


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a table for the terminal."""
    split = lambda d, f: "  ".join(f"{k}={f(v)}" for k, v in d.items())  # noqa: E731
    lines = [
        f"model {p['model']} on {p['gpus']} GPUs x {p['gpu_mem_gib']:g} GiB, "
        f"{p['peak_tflops']:g} TFLOP/s peak ({p['peak_tflops_from']}) at MFU {p['mfu']:g}",
        f"params (M)                 {split(p['params'], lambda v: f'{v / 1e6:.2f}')}",
        f"GMACs/pair with attention  {split(p['gmacs_per_sample'], lambda v: f'{v:.2f}')}",
        f"GMACs/pair linear only     {split(p['gmacs_per_sample_no_attn'], lambda v: f'{v:.2f}')}",
        f"batch                      {p['global_batch_size']:,} global, {p['per_gpu_batch']:,} per GPU, "
        f"{p['forward_batch_per_gpu']:,} per forward",
        f"steps                      {p['steps']:,} ({p['samples_seen']:.4g} samples)",
        f"total compute              {p['total_model_flops']:.3g} model FLOPs "
        f"(hardware {p['hardware_flops_per_sample'] / p['model_flops_per_sample']:.2f}x with recomputation)",
        "memory per GPU (GiB)       weights  grads  optim  gathered  activ.   loss   total",
    ]
    for name, m in p["memory_gib"].items():
        lines.append(f"  {name:<24} {m['weights']:>8.2f} {m['gradients']:>6.2f} {m['optimizer']:>6.2f} "
                     f"{m['gathered_blocks']:>9.2f} {m['activations']:>7.2f} {m['loss']:>6.2f} {m['total']:>7.2f}")
    lines += [
        f"launch check               {p['launch_check']}",
        f"loss memory (GiB)          dense {p['loss_memory_gib']['dense']:.2f}, "
        f"tiled {p['loss_memory_gib']['tiled']:.3f}",
        f"as configured              {p['memory_as_configured_gib']:.2f} GiB: "
        f"{'fits' if p['fits'] else 'does NOT fit'} in {p['gpu_mem_gib']:g} GiB",
        f"largest gradient-cache chunk that fits: {p['largest_gradcache_chunk']} samples",
        f"step time                  {p['step_time_s']:.2f} s",
        f"wall clock                 {p['wall_clock_hours']:,.1f} h ({p['wall_clock_hours'] / 24:.1f} days)",
        f"GPU-hours                  {p['gpu_hours']:,.0f}",
    ]
    return "\n".join(lines)
