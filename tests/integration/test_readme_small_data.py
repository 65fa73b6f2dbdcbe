"""The README's small-data path (`data make` -> `inspect` -> `reshard --shards 4 --val-fraction 0.1` -> `train`),
its commands read from the README and run as written, on a few small images, with a tiny run added as overrides."""
import json
import re
import shlex

import pytest

from tests.data_tools.kit import image_folder
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow
TINY_RUN = ["log.progress_bar=false", "train.global_batch_size=12", "train.total_samples=24",
            "train.log_every_steps=1", "train.checkpoint_every_samples=24", "optim.warmup_samples=12",
            "model.vision_width=32", "model.text_width=32", "model.embed_dim=32"]


def readme_commands() -> list[list[str]]:
    """The `clipscale ...` lines of the README block under 'From a folder of images with captions'."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"From a folder of images with captions.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def test_the_readme_small_data_path_runs_as_written(tmp_path):
    commands = readme_commands()
    assert [c[:3] for c in commands] == [["clipscale", "data", "make"], ["clipscale", "data", "inspect"],
                                         ["clipscale", "data", "reshard"], ["clipscale", "train", "recipes/tiny_cpu.toml"]]
    paths = image_folder(tmp_path / "photos", 60, sidecars=False)
    (tmp_path / "captions.csv").write_text("path,caption\n" + "".join(f"{p},photo number {i}\n"
                                                                      for i, p in enumerate(paths)))
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    printed = {}
    for command in commands:
        extra = [*TINY_RUN, f'run.output_dir="{tmp_path / "runs"}"'] if command[1] == "train" else []
        proc = run_cli(*command[1:], *extra, cwd=tmp_path)
        printed[command[2] if command[1] == "data" else "train"] = proc.stdout + proc.stderr

    assert "1 shards, 60 samples in shards; skipped: none" in printed["make"]
    train_spec = next(a for a in commands[-1] if a.startswith("data.train_shards="))
    assert f"train on them: clipscale train RECIPE {train_spec}  (3 shards" in printed["reshard"]
    assert "data.num_streams=3 (unset by the recipe: it follows 3 shards" in printed["train"]
    assert re.search(r"exact epochs: 3 streams x \d+ samples = \d+ of the \d+ samples of 3 shards per epoch",
                     printed["train"])
    rows = [json.loads(line) for line in (tmp_path / "runs/small/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
