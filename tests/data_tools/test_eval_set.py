"""`eval-set`: CLIP_benchmark's WebDataset layout from an ImageFolder tree or a captions table."""
import pytest

from clipscale.cli import main

from clipscale.data.shards import DataError
from clipscale.data_tools.evalset import classification_items, retrieval_items, write_eval_set
from tests.data_tools.kit import wds_samples
from tests.shard_kit import image_bytes, sample_members, write_shard


def test_image_folder_becomes_a_zero_shot_classification_set(tmp_path):
    sources = {}
    for c, name in enumerate(["golden_retriever", "tabby_cat"]):
        for i in range(3):
            path = tmp_path / "tree" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(10 * c + i, fmt="PNG"))
            sources[path.read_bytes()] = c
    items, classnames = classification_items(str(tmp_path / "tree"))
    summary = write_eval_set(items, str(tmp_path / "out"), label="cls", classnames=classnames,
                             templates=["a photo of a {c}.", "a {c}."], samples_per_shard=4)
    assert summary == {"samples": 6, "shards": 2, "skipped": {}}
    assert (tmp_path / "out/classnames.txt").read_text() == "golden retriever\ntabby cat\n"
    assert (tmp_path / "out/zeroshot_classification_templates.txt").read_text() == "a photo of a {c}.\na {c}.\n"
    assert (tmp_path / "out/test/nshards.txt").read_text() == "2\n"
    samples = wds_samples([str(tmp_path / "out/test/0.tar"), str(tmp_path / "out/test/1.tar")])
    assert [s["__key__"] for s in samples] == [f"s{i:07d}" for i in range(6)]
    assert all(int(s["cls"]) == sources[s["png"]] for s in samples)


def test_captions_table_becomes_a_retrieval_set(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(image_bytes(len(name) + ord(name[0])))
    (tmp_path / "c.csv").write_text("path,caption\na.jpg,a first\nb.jpg,b only\na.jpg,\"a second, with comma\"\n")
    items = retrieval_items(str(tmp_path / "img"), str(tmp_path / "c.csv"), path_column="path",
                            caption_column="caption")
    write_eval_set(items, str(tmp_path / "out"), split="val", label="txt")
    samples = wds_samples([str(tmp_path / "out/val/0.tar")])
    assert [(s["jpg"], s["txt"].decode()) for s in samples] == [
        ((tmp_path / "img/a.jpg").read_bytes(), "a first\na second, with comma"),
        ((tmp_path / "img/b.jpg").read_bytes(), "b only")]
    assert not (tmp_path / "out/classnames.txt").exists()


def test_templates_without_a_slot_and_existing_shards_are_refused(tmp_path):
    (tmp_path / "tree/x").mkdir(parents=True)
    (tmp_path / "tree/x/1.jpg").write_bytes(image_bytes(0))
    items, names = classification_items(str(tmp_path / "tree"))
    with pytest.raises(DataError, match=r"lack the \{c\} class slot"):
        write_eval_set(items, str(tmp_path / "out"), label="cls", classnames=names, templates=["a photo"])
    write_eval_set(items, str(tmp_path / "out"), label="cls", classnames=names)
    with pytest.raises(DataError, match="already holds shards"):
        write_eval_set(items, str(tmp_path / "out"), label="cls", classnames=names)


def test_image_text_shards_become_a_retrieval_set_through_the_cli(tmp_path):
    (tmp_path / "dl").mkdir()
    write_shard(tmp_path / "dl/00000.tar", sample_members("a", 1) + [("b.jpg", image_bytes(2)), ("b.txt", b" ")]
                + [("c.jpg", b"not an image"), ("c.txt", b"c caption")] + sample_members("d", 4))
    assert main(["data", "eval-set", str(tmp_path / "dl"), str(tmp_path / "out"), "--split", "val",
                 "--processes", "1"]) == 0
    samples = wds_samples([str(tmp_path / "out/val/0.tar")])
    assert [(s["jpg"], s["txt"]) for s in samples] == [(image_bytes(1), b"caption a"), (image_bytes(4), b"caption d")]


def test_templates_come_from_a_file_and_a_missing_one_is_named(tmp_path, capsys):
    (tmp_path / "tree/x").mkdir(parents=True)
    (tmp_path / "tree/x/1.jpg").write_bytes(image_bytes(0))
    (tmp_path / "t.txt").write_text("a {c}.\n\nan image of a {c}.\n")
    assert main(["data", "eval-set", str(tmp_path / "tree"), str(tmp_path / "out"), "--templates",
                 str(tmp_path / "t.txt"), "--processes", "1"]) == 0
    assert (tmp_path / "out/zeroshot_classification_templates.txt").read_text() == "a {c}.\nan image of a {c}.\n"
    assert main(["data", "eval-set", str(tmp_path / "tree"), str(tmp_path / "o2"), "--templates",
                 str(tmp_path / "none.txt")]) == 2
    assert f"cannot read templates file {tmp_path / 'none.txt'}" in capsys.readouterr().err


def test_split_folders_are_refused_as_classes_naming_the_right_usage(tmp_path, capsys):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            path = tmp_path / "tree" / split / name / "0.png"
            path.parent.mkdir(parents=True)
            path.write_bytes(image_bytes(0, fmt="PNG"))
    assert main(["data", "eval-set", str(tmp_path / "tree"), str(tmp_path / "out"), "--processes", "1"]) == 2
    tree = tmp_path / "tree"
    assert (f"{tree} holds the split folders ['test', 'train'], not class folders: each would become a class; make "
            f"each split on its own: clipscale data eval-set {tree}/test OUT --split test (and {tree}/train OUT "
            "--split train for a linear probe)") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["data", "eval-set", str(tree / "test"), str(tmp_path / "out"), "--processes", "1"]) == 0
    assert (tmp_path / "out/classnames.txt").read_text() == "cat\ndog\n"
