"""Typed run configuration: frozen dataclasses, TOML recipes and dotted overrides.

Precedence: dataclass defaults < recipe TOML < dotted CLI overrides (`train.global_batch_size=512`).
The defaults are the embedded smoke run (synthetic data, tiny model, CPU), so
`clipscale train` with no recipe trains something real. Every component owns its own config
dataclass and receives only that; `Config` composes them and is never mutated after `validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clipscale.data.config import DataConfig
from clipscale.errors import InputError


class ConfigError(InputError):
    """A recipe or override is wrong; the message names the key and what to do."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "tiny_cpu"
    """Run name; the run directory is `output_dir/name`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA (NCCL) when available, else CPU (gloo)."""
    accelerator: str | None = None
    """GPU the recipe was written for (`A100`, `H100`, ...): `clipscale plan` takes its peak TFLOP/s from it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "clipscale-tiny"
    """open_clip architecture (`ViT-B-32`, ...), one shipped in clipscale/model_configs, or the label
    of the recipe's own `architecture`."""
    architecture: dict | None = None
    """open_clip config table (`embed_dim`, `vision_cfg`, `text_cfg`, ...) written over `name`'s
    config; for a name open_clip does not know it must be complete."""
    timm_image_tower: str | None = None
    """timm architecture replacing the image tower (`vit_base_patch16_clip_384`, optionally `.tag`);
    its input size, mean/std, interpolation and crop come from timm."""
    embed_dim: int | None = None
    """Override: joint embedding width."""
    image_size: int | None = None
    """Override: input resolution in pixels."""
    patch_size: int | None = None
    """Override: ViT patch size in pixels."""
    vision_width: int | None = None
    """Override: ViT width (heads = width / 32 for clipscale configs, else head_width kept)."""
    vision_layers: int | None = None
    """Override: ViT depth."""
    text_width: int | None = None
    """Override: text transformer width (heads = width / 32)."""
    text_layers: int | None = None
    """Override: text transformer depth."""
    context_length: int | None = None
    """Override: text context length in tokens."""
    patch_dropout: float = 0.0
    """Fraction of image patches dropped during training (FLIP)."""
    pretrained: str | None = None
    """Local open_clip weights file to start from (never downloaded); None = random init."""
    lock_image: bool = False
    """Freeze the image tower (LiT, Zhai et al. 2022); use with `pretrained`."""
    init_logit_scale: float | None = None
    """Initial log logit scale (None = open_clip's ln(1/0.07); SigLIP uses ln(10))."""
    init_logit_bias: float | None = None
    """Initial logit bias; setting it adds the learnable bias SigLIP needs (SigLIP uses -10)."""


# The loss config sits here, not in loss.py, so that reading a config imports no torch.
@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: Literal["clip", "siglip"] = "clip"
    """CLIP InfoNCE (softmax) or SigLIP (sigmoid) loss."""
    local_loss: bool = False
    """Each rank computes its own rows against all gathered columns (open_clip --local-loss)."""
    tiled: bool = False
    """Compute the loss block by block, never materialising the B x B logits (Inf-CL)."""
    tile_size: int = 1024
    """Rows and columns per block of the tiled loss; memory grows as tile_size**2."""

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"loss.tile_size={self.tile_size} must be positive: set e.g. loss.tile_size=1024")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr_peak: float = 1e-3
    """Peak learning rate after warmup."""
    lr_min_ratio: float = 0.0
    """Final learning rate as a fraction of lr_peak."""
    warmup_samples: int = 2_000
    """Linear warmup length, in samples seen (independent of world size)."""
    schedule: Literal["cosine", "const-cooldown"] = "cosine"
    """Decay after warmup: cosine to lr_min, or constant then linear cooldown."""
    cooldown_samples: int = 0
    """Cooldown length in samples for `const-cooldown`."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to gains, biases, logit scale, embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value (None = no clipping)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    global_batch_size: int = 256
    """Samples per optimizer step summed over all ranks."""
    total_samples: int = 25_600
    """Training length in samples seen."""
    chunk_size: int | None = None
    """Gradient-cache chunk size per rank (None = no gradient caching)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: fp32, bf16 autocast (DDP) / bf16 params with fp32 reduce (FSDP2), or fp16
    autocast with a dynamic loss scale (DDP / one process only)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: DDP (replicated) or FSDP2 (fully_shard)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (less memory, one more all-gather in backward)."""
    grad_checkpointing: bool = False
    """Recompute transformer blocks in backward to save activation memory."""
    compile: bool = False
    """torch.compile the model."""
    compile_backend: str = "inductor"
    """torch.compile backend: "inductor" (needs a C++ compiler on CPU) or "aot_eager" (no compiler)."""
    log_every_steps: int = 10
    """Write a metrics line every this many steps (and at checkpoints). Ranks synchronise only then,
    so this also bounds how many steps pass before a stop signal or a non-finite streak is acted on."""
    checkpoint_every_samples: int = 12_800
    """Save a checkpoint every this many samples (and at the end)."""
    async_checkpoint: bool = True
    """Write periodic checkpoints in a background thread: the step waits only while the state is
    copied (docs/benchmarks.md). Saves on a stop signal or a non-finite streak are synchronous."""
    keep_last: int = 0
    """Keep only this many latest checkpoints (0 = keep all, needed for scaling evaluations).
    Saves on a stop signal or a non-finite streak never delete any."""
    keep_every_samples: int = 0
    """With keep_last, also keep the first checkpoint at or after each multiple of this many samples
    (0 = none)."""
    max_nonfinite_steps: int = 5
    """Stop (after saving) when this many consecutive steps had non-finite gradients (checked at
    log and checkpoint steps)."""
    collective_timeout_s: float = 600.0
    """How long a rank waits in a collective for the others before it fails (a lost node, a hung
    rank) and exits; must exceed the longest rank-0-only pause (checkpoint write, evaluation)."""
    num_threads: int | None = None
    """torch intra-op threads per process on CPU (None = cores / local processes)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    datasets: tuple[str, ...] = ("synthetic=data/synthetic/zeroshot",)
    """Evaluation sets as NAME=PATH (directory or fsspec URL in CLIP_benchmark's layout)."""
    tasks: tuple[str, ...] = ("zeroshot_classification", "zeroshot_retrieval", "contrastive_loss")
    """Tasks, each run on the sets it fits: zeroshot_classification, linear_probe (class sets),
    zeroshot_retrieval, contrastive_loss (caption sets: the held-out loss of the run's kind)."""
    batch_size: int = 256
    """Images per forward, per process."""
    num_workers: int = 2
    """DataLoader processes decoding images, per process."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Encode in fp32, or under bf16 autocast."""
    every_samples: int = 0
    """Evaluate during training every this many samples, on all ranks (0 = never)."""
    loss_batch_size: int = 256
    """Image-caption pairs per batch of the held-out contrastive loss (summed over ranks; the loss
    depends on it, so it is part of the rows' eval_hash)."""

    def __post_init__(self) -> None:
        if self.loss_batch_size < 2:
            raise ConfigError(f"eval.loss_batch_size={self.loss_batch_size} must be at least 2 (a contrastive "
                             "batch needs negatives): set e.g. eval.loss_batch_size=256")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogConfig:
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases mode."""
    wandb_project: str = "clipscale"
    progress_bar: bool = True
    """Rank-0 progress bar on stderr."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


SAFE_TO_CHANGE = frozenset({
    # where outputs go and how they are reported
    "run.output_dir", "run.name", "run.accelerator", "data.name", "log.wandb", "log.wandb_project",
    "log.progress_bar",
    *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)),
    # how often the loop logs, checkpoints and keeps checkpoints; when it gives up
    "train.log_every_steps", "train.checkpoint_every_samples", "train.async_checkpoint", "train.keep_last",
    "train.keep_every_samples", "train.max_nonfinite_steps",
    # how the same step is computed (the same math: parallelism, recomputation, gradient cache, tiling)
    "run.device", "train.parallel", "train.fsdp_reshard_after_forward", "train.grad_checkpointing",
    "train.compile", "train.compile_backend", "train.num_threads", "train.chunk_size", "loss.local_loss",
    "loss.tiled", "loss.tile_size",
    # how the same samples are read
    "data.workers", "data.decode_device", "data.shard_retries", "data.retry_backoff_s", "data.read_timeout_s",
    "data.max_failed_shards", "data.max_bad_fraction",
    # an explicit extension (or shortening): the schedule follows the new length from here on
    "train.total_samples",
})
"""Fields a resume may change without `--allow-config-change`: none of them changes what a step
computes. Any other difference from the checkpoint's config (learning rate, batch, model, data,
seed, precision, ...) changes the trajectory and is refused unless asked for."""


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "architecture":
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, new value)} for every field where `cfg` differs from `saved`
    (a config as `config_to_dict` wrote it to JSON)."""
    old = _dotted(saved)
    new = _dotted(json.loads(json.dumps(config_to_dict(cfg))))  # tuples as JSON lists, like `saved`
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def check_resume_config(saved: dict[str, Any], cfg: Config, *, allow_change: bool) -> dict[str, tuple[Any, Any]]:
    """The changes from the checkpoint's config `saved` to `cfg`; raises ConfigError listing those
    outside `SAFE_TO_CHANGE` unless `allow_change`."""
    changes = config_changes(saved, cfg)
    unsafe = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items() if k not in SAFE_TO_CHANGE]
    if unsafe and not allow_change:
        raise ConfigError(
            f"{cfg.run_dir} holds a checkpoint trained with a different config; resuming would change "
            f"the training trajectory: {'; '.join(unsafe)}. Resume with the checkpoint's values, start a "
            f"new run (run.name=...), or pass --allow-config-change to continue under the new config "
            f"(every start's config is kept in the run directory)")
    return changes


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts with type checks and helpful errors.


def _nearest(key: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return `value` if it matches the annotation `tp` (ints accepted for floats), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(path, value, arm)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: got {value!r}, expected one of {list(typing.get_args(tp))}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected None")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a table")
        return value
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {tp.__name__}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_check_type(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value))
    raise ConfigError(f"{path}: unsupported annotation {tp}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "None")


def _build(cls: type, values: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'{_nearest(key, fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; write [{full}] with keys inside it")
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _check_type(full, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=VALUE` -> (key.sub, value); VALUE is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


RECIPES = Path(__file__).parent / "recipes"
"""The published recipes shipped with clipscale (the repository's recipes/, linked into the package)."""


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe file: `recipe` itself when it is a file, else the shipped recipe of that name
    (`vit_g14_laion2b` or `vit_g14_laion2b.toml`), so an installed clipscale finds its recipes."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES / path.with_suffix(".toml").name
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES.glob("*.toml"))
    raise ConfigError(f"recipe not found: {recipe}; pass a TOML file or one of the shipped recipes {names}")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = resolve_recipe(path)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from e


SWEEP_POINT = "sweep={}"
"""The override `load_sweep` puts first in every run's overrides: this run is one point of the sweep."""


def load_config(recipe: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults < recipe < overrides, type-checked; raises ConfigError naming the bad key.

    A recipe with a `[sweep]` table describes many runs and is refused, unless the overrides
    empty the table (`sweep={}`, as in every run `load_sweep` expands) to train one point.
    """
    tree: dict[str, Any] = read_toml(recipe) if recipe else {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    if tree.pop("sweep", None):
        raise ConfigError(
            f"{recipe} has a [sweep] table, which describes several runs, but this trains one: run "
            f"`clipscale sweep {recipe}` to train every run of the sweep, or add the override "
            f"{SWEEP_POINT} to train the base recipe alone")
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")


def record_config(cfg: Config, run_dir: Path) -> None:
    """Write `cfg` as run_dir/config.json, keeping an earlier different one as config.N.json
    (N = 0, 1, ... in order of the starts that used them): every start's config stays on disk."""
    current = run_dir / "config.json"
    text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
    if current.is_file() and current.read_text() != text:
        earlier = len(list(run_dir.glob("config.*.json")))
        (run_dir / f"config.{earlier}.json").write_text(current.read_text())
    tmp = current.with_name("config.json.tmp")
    tmp.write_text(text)
    os.replace(tmp, current)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _above(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v > low), f"> {low}"


def _within(low: float, high: float, *, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    if high_open:
        return (lambda v: low <= v < high), f"in [{low}, {high})"
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


# Every numeric field's allowed values (an unset optional field is not checked).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.embed_dim": _at_least(1), "model.image_size": _at_least(1), "model.patch_size": _at_least(1),
    "model.vision_width": _at_least(1), "model.vision_layers": _at_least(1), "model.text_width": _at_least(1),
    "model.text_layers": _at_least(1), "model.context_length": _at_least(1),
    "model.patch_dropout": _within(0, 1, high_open=True),
    "optim.lr_peak": _above(0), "optim.lr_min_ratio": _within(0, 1), "optim.warmup_samples": _at_least(0),
    "optim.cooldown_samples": _at_least(0), "optim.weight_decay": _at_least(0),
    "optim.beta1": _within(0, 1, high_open=True), "optim.beta2": _within(0, 1, high_open=True),
    "optim.eps": _above(0), "optim.grad_clip_norm": _above(0),
    "train.global_batch_size": _at_least(1), "train.total_samples": _at_least(1), "train.chunk_size": _at_least(1),
    "train.log_every_steps": _at_least(1), "train.checkpoint_every_samples": _at_least(0),
    "train.keep_last": _at_least(0), "train.keep_every_samples": _at_least(0),
    "train.max_nonfinite_steps": _at_least(1), "train.collective_timeout_s": _above(0),
    "train.num_threads": _at_least(1),
    "eval.batch_size": _at_least(1), "eval.num_workers": _at_least(0), "eval.every_samples": _at_least(0),
    "data.train_num_samples": _at_least(1), "data.num_streams": _at_least(1), "data.workers": _at_least(0),
    "data.shuffle_buffer": _at_least(0), "data.shuffle_buffer_mb": _above(0), "data.block_shards": _at_least(1),
    "data.crop_scale_min": _within(0, 1), "data.max_bad_fraction": _within(0, 1),
    "data.shard_retries": _at_least(0), "data.retry_backoff_s": _at_least(0), "data.read_timeout_s": _above(0),
    "data.max_failed_shards": _at_least(1),
}


def check_ranges(cfg: Config) -> None:
    """Every field of `RANGES` within its range, else a ConfigError naming the field, its value and the range."""
    for key, (ok, allowed) in RANGES.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}; set {key} to a value {allowed}")


def validate(cfg: Config) -> None:
    """Ranges and the combinations that do not depend on the launch; `load_config` runs it."""
    check_ranges(cfg)
    t = cfg.train
    if t.total_samples < t.global_batch_size:
        raise ConfigError(
            f"train.total_samples={t.total_samples} is less than one global batch "
            f"({t.global_batch_size}); raise it"
        )
    if t.precision == "fp16" and t.parallel == "fsdp":
        raise ConfigError(
            "train.precision='fp16' with train.parallel='fsdp' is not supported: FSDP2 needs a "
            "sharded grad scaler; use train.precision='bf16' with FSDP2 (or parallel='ddp' for fp16)"
        )
    if cfg.eval.every_samples and t.parallel == "fsdp":
        raise ConfigError("eval.every_samples needs full parameters on every rank (train.parallel='ddp'); with "
                          "FSDP2 evaluate the checkpoints beside training: clipscale eval RUN_DIR --watch")
    if cfg.loss.kind == "siglip" and cfg.model.init_logit_bias is None:
        raise ConfigError("loss.kind='siglip' needs a logit bias: set model.init_logit_bias=-10.0")
    if cfg.optim.schedule == "const-cooldown" and cfg.optim.cooldown_samples > t.total_samples:
        raise ConfigError(f"optim.cooldown_samples={cfg.optim.cooldown_samples} is longer than the run "
                          f"(train.total_samples={t.total_samples}); shorten the cooldown")


def validate_for_world(cfg: Config, world_size: int) -> None:
    """`validate`, then the checks that depend on the launch; run before any process group starts."""
    validate(cfg)
    if cfg.train.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the world size "
            f"{world_size}; set it to a multiple of {world_size}"
        )


def load_sweep(recipe: str | Path, extra: typing.Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """Expand a sweep recipe into (run name, overrides) pairs.

    A sweep recipe is a normal recipe plus a `[sweep]` table whose entries are axes: lists of
    override sets `{ name = "w64", "model.vision_width" = 64, ... }`. Runs are the product of
    the axes, named `<run.name>-<name>-<name>...`. Each run's overrides start with `sweep={}`, so
    `clipscale train RECIPE *overrides` trains exactly that run. Each run is validated with the
    `extra` overrides (data paths, batch size) the caller applies to every run after its own.
    """
    import itertools

    tree = read_toml(recipe)
    axes = tree.get("sweep")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{recipe}: no [sweep] table with axes")
    base = load_config(recipe, [SWEEP_POINT, *extra]).run.name
    options: list[list[tuple[str, list[str]]]] = []
    for axis, entries in axes.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"sweep.{axis} must be a list of inline tables of overrides")
        axis_opts = []
        for i, entry in enumerate(entries):
            entry = dict(entry)
            label = str(entry.pop("name", f"{axis}{i}"))
            axis_opts.append((label, [f"{k}={_toml_value(v)}" for k, v in entry.items()]))
        options.append(axis_opts)
    runs = []
    for combo in itertools.product(*options):
        name = "-".join([base] + [label for label, _ in combo])
        overrides = [SWEEP_POINT] + [o for _, ovs in combo for o in ovs] + [f"run.name={_toml_value(name)}"]
        load_config(recipe, [*overrides, *extra])  # fail now, naming the key, not minutes into the sweep
        runs.append((name, overrides))
    return runs


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
