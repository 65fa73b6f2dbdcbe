"""What a resume may change in the config, and every start's config kept."""
import json

import pytest

from clipscale.config import (SAFE_TO_CHANGE, ConfigError, check_resume_config, config_to_dict, load_config,
                              record_config)


def saved(*overrides: str) -> dict:
    return json.loads(json.dumps(config_to_dict(load_config(None, list(overrides)))))


def test_every_safe_field_exists():
    sections = config_to_dict(load_config())
    fields = {f"{section}.{key}" for section, values in sections.items() for key in values}
    assert SAFE_TO_CHANGE <= fields


def test_a_trajectory_change_is_refused_naming_each_difference():
    with pytest.raises(ConfigError, match=r"optim.lr_peak: 0.001 -> 0.005; run.seed: 0 -> 1\. .*--allow-config-change"):
        check_resume_config(saved(), load_config(None, ["optim.lr_peak=5e-3", "run.seed=1"]), allow_change=False)
    changes = check_resume_config(saved(), load_config(None, ["optim.lr_peak=5e-3"]), allow_change=True)
    assert changes == {"optim.lr_peak": (1e-3, 5e-3)}


def test_safe_changes_pass_and_are_reported():
    cfg = load_config(None, ["train.total_samples=51200", "train.parallel=fsdp", "eval.every_samples=0",
                             'eval.datasets=["a=b"]', "train.keep_last=2", "run.accelerator=H100", "data.name=mine"])
    changes = check_resume_config(saved(), cfg, allow_change=False)
    assert set(changes) == {"train.total_samples", "train.parallel", "eval.datasets", "train.keep_last",
                            "run.accelerator", "data.name"}


def test_every_start_config_is_kept_in_order(tmp_path):
    for lr in (1e-3, 1e-3, 2e-3, 3e-3):
        record_config(load_config(None, [f"optim.lr_peak={lr}"]), tmp_path)
    kept = {p.name: json.loads(p.read_text())["optim"]["lr_peak"] for p in tmp_path.iterdir()}
    assert kept == {"config.0.json": 1e-3, "config.1.json": 2e-3, "config.json": 3e-3}
