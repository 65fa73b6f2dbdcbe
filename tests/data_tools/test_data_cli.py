"""The entry points: `clipscale data <verb>` and `python -m clipscale.data_tools <verb>`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipscale.cli import main
from tests.shard_kit import image_bytes, sample_members, write_dataset, write_shard

REPO = Path(__file__).resolve().parents[2]


def test_clipscale_data_synth_writes_the_synthetic_dataset(tmp_path):
    assert main(["data", "synth", str(tmp_path), "--train-samples", "40", "--samples-per-shard", "20",
                 "--zeroshot-samples", "10", "--image-size", "16", "--processes", "1"]) == 0
    assert json.loads((tmp_path / "train/sizes.json").read_text()) == {"000000.tar": 20, "000001.tar": 20}
    assert list((tmp_path / "zeroshot").rglob("*.tar")) and (tmp_path / "dataset.json").exists()


def test_clipscale_data_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "--help"])
    assert exit_.value.code == 0
    assert "sizes,make,validate,inspect,reshard,synth,eval-set" in capsys.readouterr().out


def test_validate_exit_status_and_bad_input_messages(tmp_path, capsys):
    good = write_shard(tmp_path / "good.tar", sample_members("a", 0))
    assert main(["data", "validate", str(good), "--processes", "1"]) == 0
    bad = write_shard(tmp_path / "bad.tar", sample_members("a", 0) + [("b.jpg", image_bytes(1)[:100]), ("b.txt", b"x")])
    report = tmp_path / "report.json"
    assert main(["data", "validate", str(bad), "--processes", "1", "--report", str(report)]) == 1
    assert f"bad: {bad} b corrupt_image" in capsys.readouterr().out
    assert json.loads(report.read_text())["bad"] == {"corrupt_image": 1}
    # --fix: the clean shards are the result, so the run succeeds; the table still counts the bad samples
    assert main(["data", "validate", str(bad), "--processes", "1", "--fix", str(tmp_path / "fixed")]) == 0
    assert f"bad: {bad} b corrupt_image" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path / "fixed"), "--processes", "1"]) == 0
    assert main(["data", "validate", str(tmp_path / "g*.tar"), "--processes", "1"]) == 0  # a glob: good.tar
    assert main(["data", "validate", str(tmp_path / "nowhere/*.tar")]) == 2
    assert f"SHARDS='{tmp_path}/nowhere/*.tar': {tmp_path}/nowhere/*.tar matches no file" in capsys.readouterr().err
    assert main(["data", "validate", str(tmp_path / "nowhere")]) == 2
    assert f"1 of 1 shards of {str(tmp_path / 'nowhere')!r} do not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_data_tools_sizes(tmp_path):
    write_dataset(tmp_path, [3, 5], with_sizes=False)
    done = subprocess.run([sys.executable, "-m", "clipscale.data_tools", "sizes", str(tmp_path), "--processes", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 shards, 8 samples" in done.stdout
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 5}


def test_the_readme_flow_through_the_cli(tmp_path, capsys):
    from tests.data_tools.kit import image_folder

    paths = image_folder(tmp_path / "photos", 12, sidecars=False)
    rows = "".join(f"{p}\tphoto {i}\n" for i, p in enumerate(paths))
    (tmp_path / "captions.tsv").write_text("path\tcaption\n" + rows)
    one = ["--processes", "1"]
    assert main(["data", "make", str(tmp_path / "photos"), str(tmp_path / "shards"), "--captions",
                 str(tmp_path / "captions.tsv"), "--samples-per-shard", "5", "--max-side", "14", "--quality", "80",
                 *one]) == 0
    out = capsys.readouterr().out
    assert f"3 shards, 12 samples in {tmp_path / 'shards'}; skipped: none" in out
    assert f"train on them: clipscale train RECIPE data.train_shards={tmp_path / 'shards'}  (3 shards" in out
    assert main(["data", "validate", str(tmp_path / "shards"), *one]) == 0
    assert main(["data", "reshard", str(tmp_path / "shards"), str(tmp_path / "re"), "--shards", "4",
                 "--val-fraction", "0.25", *one]) == 0
    out = capsys.readouterr().out
    assert "train: 3 shards" in out and "val: 1 shards" in out
    assert f"data.train_shards={tmp_path / 're/train'}  (3 shards" in out
    assert main(["data", "inspect", f"{tmp_path}/re/train/{{000000..000002}}.tar", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report/contact_sheet.png").exists()
    assert main(["data", "sizes", str(tmp_path / "re/val"), "--count", *one]) == 0


def test_make_names_the_skipped_inputs(tmp_path, capsys):
    from tests.data_tools.kit import image_folder

    image_folder(tmp_path / "photos", 4)
    (tmp_path / "photos/sub1/img001.jpg").write_bytes(image_bytes(1)[:100])  # truncated
    (tmp_path / "photos/sub0/img002.txt").unlink()  # no caption
    report = tmp_path / "make.json"
    assert main(["data", "make", str(tmp_path / "photos"), str(tmp_path / "shards"), "--report", str(report),
                 "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped: sub0/img002.jpg missing_caption" in out and "skipped: sub1/img001.jpg corrupt_image" in out
    assert json.loads(report.read_text())["skipped"] == [["sub0/img002.jpg", "missing_caption"],
                                                         ["sub1/img001.jpg", "corrupt_image"]]
