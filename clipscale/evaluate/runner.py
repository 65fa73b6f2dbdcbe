"""Evaluate models on evaluation sets and append the rows to the long results table.

Targets: a run directory (every complete checkpoint; rows in RUN/results.jsonl), one checkpoint
(rows in its run's results.jsonl), or open_clip weights outside a run, an exported directory or an
architecture with a local weights file (rows in the `out` file). Evaluations already in the table
are skipped. Under torchrun every rank encodes its share of the images and rank 0 writes the rows.
A watcher (`watch_run`) evaluates a run's checkpoints while it trains and ends when training does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from clipscale import dist
from clipscale.checkpoint import META, checkpoint_name, complete_checkpoints, load_weights_if_present, read_meta
from clipscale.compute import gmacs_per_sample
from clipscale.config import Config, ConfigError, EvalConfig, ModelConfig, config_from_dict
from clipscale.evaluate.datasets import EvalDataError, EvalSet, open_eval_set
from clipscale.evaluate.features import encode_split
from clipscale.evaluate.heldout_loss import heldout_loss, loss_kind_of
from clipscale.evaluate.linear_probe import linear_probe
from clipscale.evaluate.retrieval import retrieval_metrics
from clipscale.evaluate.zeroshot import zeroshot_classification
from clipscale.export import export_bundle
from clipscale.models import ModelBundle, build_model, count_params
from clipscale.optim import crossed
from clipscale.results import RESULTS, TASKS, ModelInfo, append_rows, evaluation_key, make_rows, read_rows
from clipscale.run_state import activity, training_stopped

log = logging.getLogger(__name__)
TASK_ALIASES = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "loss": "contrastive_loss",
                **{t: t for t in TASKS}}
CAPTION_TASKS = ("zeroshot_retrieval", "contrastive_loss")


def parse_tasks(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Task names or their short forms (zeroshot, retrieval, linear_probe, loss) -> task names."""
    unknown = [n for n in names if n not in TASK_ALIASES]
    if unknown or not names:
        raise ConfigError(f"tasks {list(names)}: choose from {sorted(TASK_ALIASES)}")
    return tuple(dict.fromkeys(TASK_ALIASES[n] for n in names))


def open_sets(specs: tuple[str, ...] | list[str]) -> list[EvalSet]:
    """`NAME=PATH` specs -> evaluation sets, metadata checked."""
    sets = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"evaluation set {spec!r} must look like NAME=PATH, e.g. imagenet1k=/data/wds_imagenet1k")
        sets.append(open_eval_set(name, path))
    if not sets:
        raise ConfigError("no evaluation sets: set eval.datasets or pass --data NAME=PATH")
    return sets


def tasks_for(evalset: EvalSet, tasks: tuple[str, ...]) -> list[str]:
    """The requested tasks that fit `evalset`; an error when none does, saying what the set lacks."""
    if evalset.kind == "retrieval":
        fitting = [t for t in tasks if t in CAPTION_TASKS]
        if fitting:
            return fitting
        raise EvalDataError(f"{evalset.root}/classnames.txt is missing, so {evalset.name} is read as a retrieval "
                            f"set and none of {list(tasks)} applies; write classnames.txt (one class name per "
                            "line) and zeroshot_classification_templates.txt, or add the task zeroshot_retrieval")
    fitting = [t for t in tasks if t not in CAPTION_TASKS]
    if not fitting:
        raise EvalDataError(f"{evalset.name} ({evalset.root}) is a classification set; {' and '.join(tasks)} "
                            f"need{'s' if len(tasks) == 1 else ''} captions: add the task zeroshot_classification "
                            "or linear_probe")
    if "linear_probe" in fitting and not evalset.has_split("train"):
        raise EvalDataError(f"{evalset.root}/train is missing; linear_probe fits on a train split: write it "
                            f"beside {evalset.root}/test, or drop linear_probe from the tasks")
    return fitting


def evaluate_model(model: torch.nn.Module, *, tokenizer: Callable, preprocess: Callable, sets: list[EvalSet],
                   cfg: EvalConfig, device: torch.device, loss_kind: str | None = None,
                   skip: Callable[[str, EvalSet], bool] = lambda task, s: False,
                   ) -> Iterator[tuple[str, EvalSet, dict[str, float]]]:
    """Yield (task, set, metrics) for each fitting task not skipped (collective under torchrun).

    loss_kind: "clip" | "siglip", the held-out loss's kind (None: `loss_kind_of(model)`).
    """
    tasks = parse_tasks(cfg.tasks)
    was_training = model.training
    model.eval()
    try:
        for evalset in sets:
            todo = [t for t in tasks_for(evalset, tasks) if not skip(t, evalset)]
            if not todo:
                continue
            encode = dict(preprocess=preprocess, tokenizer=tokenizer, device=device, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, precision=cfg.precision)
            test = encode_split(model, evalset, "test", **encode)
            if "zeroshot_classification" in todo:
                yield "zeroshot_classification", evalset, zeroshot_classification(
                    model, evalset, image_features=test.image_features, labels=test.labels, tokenizer=tokenizer,
                    device=device, precision=cfg.precision)
            if "zeroshot_retrieval" in todo:
                yield "zeroshot_retrieval", evalset, retrieval_metrics(
                    test.image_features, test.text_features, test.text_image_index)
            if "contrastive_loss" in todo:
                yield "contrastive_loss", evalset, heldout_loss(
                    test.image_features, test.text_features, test.text_image_index, logit_scale=model.logit_scale.exp(),
                    logit_bias=getattr(model, "logit_bias", None), kind=loss_kind or loss_kind_of(model),
                    batch_size=cfg.loss_batch_size, device=device, name=evalset.name)
            if "linear_probe" in todo:
                train = encode_split(model, evalset, "train", **encode)
                yield "linear_probe", evalset, linear_probe(
                    train.image_features, train.labels, test.image_features, test.labels,
                    num_classes=len(evalset.classnames))
    finally:
        model.train(was_training)


def task_hash(task: str, evalset: EvalSet, *, loss_kind: str, loss_batch_size: int) -> str:
    """The rows' eval_hash: the set's prompts, and for the held-out loss also its kind and batch size."""
    if task != "contrastive_loss":
        return evalset.eval_hash
    text = json.dumps([task, loss_kind, loss_batch_size, evalset.eval_hash])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluate_weights(bundle: ModelBundle, info: ModelInfo, *, sets: list[EvalSet], cfg: EvalConfig,
                     device: torch.device, results: Path, loss_kind: str | None = None) -> list[dict[str, Any]]:
    """Evaluate one set of weights, appending each evaluation's rows to `results` (rank 0) at once."""
    # Rank 0 alone reads the table: every rank must skip the same evaluations or the gathers would hang.
    done = dist.rank0_value(lambda: {evaluation_key(r) for r in read_rows(results)})
    loss_kind = loss_kind or loss_kind_of(bundle.model)
    probe = dataclasses.asdict(info)

    def eval_hash(task: str, evalset: EvalSet) -> str:
        return task_hash(task, evalset, loss_kind=loss_kind, loss_batch_size=cfg.loss_batch_size)

    def skip(task: str, evalset: EvalSet) -> bool:
        return evaluation_key({**probe, "task": task, "eval_dataset": evalset.name,
                               "eval_hash": eval_hash(task, evalset)}) in done

    new = []
    for task, evalset, metrics in evaluate_model(bundle.model, tokenizer=bundle.tokenizer,
                                                 preprocess=bundle.preprocess_val, sets=sets, cfg=cfg,
                                                 device=device, loss_kind=loss_kind, skip=skip):
        rows = make_rows(info, task=task, eval_dataset=evalset.name, eval_hash=eval_hash(task, evalset),
                         metrics=metrics)
        if dist.rank() == 0:
            append_rows(results, rows)
        log.info("%s %s %s %s: %s", info.run, info.checkpoint, task, evalset.name,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        new.extend(rows)
    return new


def pick_device(device: str) -> torch.device:
    """"auto" -> this rank's GPU when there is one, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


def run_config(run_dir: Path) -> Config:
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {config_file} is missing")
    return config_from_dict(json.loads(config_file.read_text()))


def evaluate_run(run_dir: str | Path, *, overrides: dict[str, Any] | None = None, device: str = "auto",
                 checkpoints: list[Path] | None = None) -> list[dict[str, Any]]:
    """Evaluate every complete checkpoint of a run (or the given ones) not yet in RUN/results.jsonl.

    The run's own `[eval]` table applies, with `overrides` ({"datasets": ..., "tasks": ...}) on
    top. Returns the new rows.
    """
    run_dir = Path(run_dir)
    run_cfg = run_config(run_dir)
    cfg = dataclasses.replace(run_cfg.eval, **(overrides or {}))
    if checkpoints is None:  # training may add one while the ranks look: they agree on rank 0's view
        checkpoints = dist.rank0_value(lambda: complete_checkpoints(run_dir / "checkpoints"))
    if not checkpoints:
        return []
    sets, dev = open_sets(cfg.datasets), pick_device(device)
    bundle = build_model(dataclasses.replace(run_cfg.model, pretrained=None), device=dev)
    params, gmacs = count_params(bundle.model), gmacs_per_sample(bundle)
    rows = []
    for path in checkpoints:
        meta = load_weights_if_present(path, bundle.model)
        if not all(dist.gather_objects(meta is not None)):  # every rank skips it, or none
            log.warning("%s was removed after it was listed (pruned by training?): skipped", path)
            continue
        info = ModelInfo(run=run_cfg.run.name, model=run_cfg.model.name, checkpoint=path.name, step=meta["step"],
                         samples_seen=meta["samples_seen"], params=params, gmacs_per_sample=gmacs,
                         dataset=run_cfg.data.dataset_name)
        rows += evaluate_weights(bundle, info, sets=sets, cfg=cfg, device=dev, results=run_dir / RESULTS,
                                 loss_kind=run_cfg.loss.kind)
    return rows


class _Watch:
    """Rank 0's view of a run between looks: when it last changed."""

    def __init__(self, run_dir: Path, *, idle_timeout_s: float) -> None:
        self.run_dir, self.idle_timeout_s = run_dir, idle_timeout_s
        self.last, self.changed_at = None, time.monotonic()

    def look(self) -> tuple[str | None, list[Path]]:
        """(why to stop after evaluating, or None; complete checkpoints). The state is read before the
        listing: a checkpoint that training writes after this look is listed by the next one."""
        now, seen = time.monotonic(), activity(self.run_dir)
        unchanged = seen == self.last
        if not unchanged:
            self.last, self.changed_at = seen, now
        stop = training_stopped(self.run_dir)
        if stop and unchanged:  # and still so one poll later: a restarting job would have changed something
            reason = stop
        elif now - self.changed_at >= self.idle_timeout_s:
            reason = f"nothing in {self.run_dir} changed for {now - self.changed_at:.0f} s (--idle-timeout-s)"
        else:
            reason = None
        return reason, complete_checkpoints(self.run_dir / "checkpoints")


def _is_final(checkpoint: Path, total_samples: int) -> bool:
    try:
        return read_meta(checkpoint)["samples_seen"] >= total_samples
    except FileNotFoundError:  # pruned since the listing: not the newest then
        return False


def watch_run(run_dir: str | Path, *, overrides: dict[str, Any] | None = None, device: str = "auto",
              poll_s: float = 60.0, idle_timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """Evaluate checkpoints as they appear until the run's final checkpoint is evaluated, or until
    training has stopped short of it: it exited or was killed on this host (`run_state`), or nothing
    in the run changed for `idle_timeout_s` (a trainer killed on another host)."""
    run_dir = Path(run_dir)
    total = run_config(run_dir).train.total_samples
    watch = _Watch(run_dir, idle_timeout_s=idle_timeout_s)  # used on rank 0 only
    rows: list[dict[str, Any]] = []
    while True:
        stop, checkpoints = dist.rank0_value(watch.look)
        rows += evaluate_run(run_dir, overrides=overrides, device=device, checkpoints=checkpoints)
        if checkpoints and dist.rank0_value(lambda: _is_final(checkpoints[-1], total)):
            return rows
        if stop:
            log.warning("stopped watching %s before its final checkpoint: %s", run_dir, stop)
            return rows
        time.sleep(poll_s)


def evaluate_open_clip(name: str, *, pretrained: str | None, out: str | Path, cfg: EvalConfig,
                       device: str = "auto", run: str | None = None, dataset: str = "unknown") -> list[dict[str, Any]]:
    """Evaluate open_clip weights outside a run into `out`: an architecture with a local weights file
    (a published model), or an exported directory `local-dir:DIR`, whose rows carry the run's
    provenance (run, checkpoint, step, samples seen, data) when clipscale exported it."""
    dev = pick_device(device)
    info = None
    if name.startswith("local-dir:"):
        bundle, info = export_bundle(name.removeprefix("local-dir:"), device=dev)
        name = Path(name.removeprefix("local-dir:")).resolve().name
    elif pretrained is not None and not Path(pretrained).is_file():
        raise ConfigError(f"--pretrained {pretrained} is not a file (weights are never downloaded)")
    else:
        bundle = build_model(ModelConfig(name=name, pretrained=pretrained), device=dev)
    info = info or ModelInfo(run=run or (Path(pretrained).stem if pretrained else name), model=name, checkpoint=None,
                             step=None, samples_seen=None, params=count_params(bundle.model),
                             gmacs_per_sample=gmacs_per_sample(bundle), dataset=dataset)
    return evaluate_weights(bundle, info, sets=open_sets(cfg.datasets), cfg=cfg, device=dev, results=Path(out))


def evaluate_target(target: str, *, overrides: dict[str, Any], device: str, out: str | None,
                    poll_s: float | None = None, idle_timeout_s: float = 3600.0) -> list[dict[str, Any]]:
    """Evaluate a run directory (watching it for new checkpoints every `poll_s` seconds when given),
    a checkpoint directory or an exported open_clip directory."""
    path = Path(target)
    if (path / META).is_file():  # one checkpoint: rows go to its run's table
        return evaluate_run(path.parent.parent, overrides=overrides, device=device, checkpoints=[path])
    if (path / "config.json").is_file():
        if poll_s is not None:
            return watch_run(path, overrides=overrides, device=device, poll_s=poll_s, idle_timeout_s=idle_timeout_s)
        return evaluate_run(path, overrides=overrides, device=device)
    if (path / "open_clip_config.json").is_file():
        if out is None or "datasets" not in overrides:
            raise ConfigError(f"{path} is an exported model outside a run: pass --out FILE.jsonl and --data NAME=PATH")
        return evaluate_open_clip(f"local-dir:{path}", pretrained=None, out=out, cfg=EvalConfig(**overrides),
                                  device=device)
    raise ConfigError(f"{path} is neither a run directory (config.json), a checkpoint (meta.json) nor an exported "
                      "model (open_clip_config.json); for published weights pass --model ARCH --pretrained FILE")


def maybe_eval(cfg: Config, *, model: torch.nn.Module, bundle: ModelBundle, step: int, samples_seen: int,
               batch_size: int, checkpoint_due: bool) -> None:
    """During training: evaluate when the last step crossed a multiple of `eval.every_samples`.

    Collective: every rank calls it with the unwrapped model (full parameters: DDP or one process).
    When this step's checkpoint is due, the rows name it, so `clipscale eval` does not redo them.
    """
    if not crossed(samples_seen, batch_size, cfg.eval.every_samples):
        return
    bundle = dataclasses.replace(bundle, model=model)
    checkpoint = checkpoint_name(step) if checkpoint_due else None
    info = ModelInfo(run=cfg.run.name, model=cfg.model.name, checkpoint=checkpoint, step=step,
                     samples_seen=samples_seen, params=count_params(model), gmacs_per_sample=gmacs_per_sample(bundle),
                     dataset=cfg.data.dataset_name)
    evaluate_weights(bundle, info, sets=open_sets(cfg.eval.datasets), cfg=cfg.eval,
                     device=next(model.parameters()).device, results=cfg.run_dir / RESULTS, loss_kind=cfg.loss.kind)
