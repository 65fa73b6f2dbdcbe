"""Evaluation set layouts: CLIP_benchmark WebDataset, ImageFolder, ImageNet metadata; every bad layout names the file."""
import open_clip.zero_shot_metadata as zsm
import pytest
import torch

from clipscale.config import EvalConfig
from clipscale.data import decode
from clipscale.evaluate.datasets import EvalDataError, open_eval_set
from clipscale.evaluate.runner import evaluate_model, tasks_for
from tests.eval_kit import CLASSNAMES, TEMPLATES, DesignedCLIP, swatch, to_tensor, tokenizer, write_classification_set, \
    write_tar


def evaluate(root, *, name="swatches", tasks=("zeroshot_classification",), workers=0):
    cfg = EvalConfig(tasks=tasks, batch_size=4, num_workers=workers)
    return list(evaluate_model(DesignedCLIP(), tokenizer=tokenizer(), preprocess=to_tensor,
                               sets=[open_eval_set(name, str(root))], cfg=cfg, device=torch.device("cpu")))


def test_shards_without_nshards_are_found_in_natural_order(tmp_path):
    root = write_classification_set(tmp_path, [[(k % 8, k % 8)] for k in range(11)])
    (root / "test" / "nshards.txt").unlink()
    units = open_eval_set("s", str(root)).units("test")
    assert [u.rsplit("/", 1)[1] for u in units] == [f"{k}.tar" for k in range(11)]
    [(_, _, metrics)] = evaluate(root)
    assert metrics["acc1"] == 1.0


def test_image_folder_tree_reads_like_the_shards(tmp_path):
    for k in (0, 1, 2):
        folder = tmp_path / "test" / f"c{k}"
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(swatch(k))
        (folder / "b.png").write_bytes(swatch((k + 1) % 8))  # a miss, predicted as the next colour
    (tmp_path / "classnames.txt").write_text("".join(f"c{k}\t{CLASSNAMES[k]}\n" for k in (0, 1, 2)))
    (tmp_path / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    evalset = open_eval_set("folders", str(tmp_path))
    assert evalset.classnames == tuple(CLASSNAMES[:3])
    [(_, _, metrics)] = evaluate(tmp_path, name="folders")
    assert metrics == {"acc1": 0.5, "mean_per_class_recall": 0.5}


def test_imagenet_sets_take_open_clip_metadata(tmp_path):
    write_tar(tmp_path / "test" / "0.tar", [{"jpg": swatch(0), "cls": b"3"}])
    evalset = open_eval_set("imagenet1k", str(tmp_path))
    assert evalset.classnames == tuple(zsm.IMAGENET_CLASSNAMES)
    assert evalset.templates == tuple(t("{c}") for t in zsm.OPENAI_IMAGENET_TEMPLATES)
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}.\n")  # the set's own file wins
    assert open_eval_set("imagenet1k", str(tmp_path)).templates == ("a {c}.",)


def test_eval_hash_changes_with_prompts(tmp_path):
    root = write_classification_set(tmp_path, [[(0, 0)]])
    before = open_eval_set("s", str(root)).eval_hash
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    assert open_eval_set("s", str(root)).eval_hash != before


@pytest.mark.parametrize("edit, match", [
    (lambda r: (r / "classnames.txt").unlink(), r"classnames\.txt is missing.*write classnames\.txt \(one class name"),
    (lambda r: (r / "classnames.txt").write_text("\n\n"), r"classnames\.txt is empty; write class names"),
    (lambda r: (r / "zeroshot_classification_templates.txt").unlink(),
     r"zeroshot_classification_templates\.txt is missing; write one prompt template per line"),
    (lambda r: (r / "zeroshot_classification_templates.txt").write_text("a {c}.\na photo of a {}.\n"),
     r"zeroshot_classification_templates\.txt: template 2 'a photo of a \{\}\.' needs a '\{c\}' slot"),
    (lambda r: (r / "zeroshot_classification_templates.txt").write_text("a photo\n"),
     r"template 1 'a photo' needs a '\{c\}' slot.*write e\.g\. 'a photo of a \{c\}\.'"),
    (lambda r: (r / "test" / "nshards.txt").write_text("two"), r"nshards\.txt holds 'two'; write the number of shards"),
    (lambda r: (r / "dataset_type.txt").write_text("segmentation"), r"dataset_type\.txt says 'segmentation'"),
])
def test_bad_metadata_names_the_file_and_the_fix(tmp_path, edit, match):
    root = write_classification_set(tmp_path, [[(0, 0)]])
    edit(root)
    with pytest.raises(EvalDataError, match=match) as err:
        evaluate(root)
    assert str(root) in str(err.value)


@pytest.mark.parametrize("members, match", [
    ({"png": swatch(0), "cls": b"8"}, r"1\.tar:000000001\.cls: class 8 is outside \[0, 8\) of classnames\.txt; write"),
    ({"png": swatch(0), "cls": b"x"}, r"1\.tar:000000001\.cls holds b'x'; write the class index as an integer"),
    ({"cls": b"1"}, r"1\.tar:000000001 has members \['cls'\]; a sample needs an image"),
    ({"jpg": b"not a jpeg", "cls": b"1"}, r"1\.tar:000000001\.jpg: unusable image \(not_an_image\); rewrite"),
])
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_name_shard_key_and_fix(tmp_path, members, match, workers):
    root = write_classification_set(tmp_path, [[(0, 0)], []])
    write_tar(root / "test" / "1.tar", [members], first_key=1)
    with pytest.raises(EvalDataError, match=match):
        evaluate(root, workers=workers)


def test_truncated_shard_and_oversized_image_are_refused(tmp_path, monkeypatch):
    root = write_classification_set(tmp_path, [[(0, 0), (1, 1)]])
    shard = root / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(EvalDataError, match=r"0\.tar cannot be read .* truncated or corrupt: rewrite it"):
        evaluate(root)
    root = write_classification_set(tmp_path / "b", [[(0, 0)]])
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 24 * 24 - 1)
    with pytest.raises(EvalDataError, match=r"000000000\.png: unusable image \(decompression_bomb: 24x24 > 575"):
        evaluate(root)


def test_missing_directory_split_and_empty_split(tmp_path):
    with pytest.raises(EvalDataError, match=f"evaluation set s: {tmp_path / 'nope'} is not a directory"):
        open_eval_set("s", str(tmp_path / "nope"))
    root = write_classification_set(tmp_path, [[]])
    with pytest.raises(EvalDataError, match=r"test: the split yielded no samples"):
        evaluate(root)
    (root / "test" / "0.tar").unlink()
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(EvalDataError, match=r"test has no \*\.tar shards or class folders; write the test split"):
        evaluate(root)


def test_tasks_that_do_not_fit_the_set_say_what_to_write(tmp_path):
    root = write_classification_set(tmp_path, [[(0, 0)]])
    with pytest.raises(EvalDataError, match="linear_probe fits on a train split"):
        tasks_for(open_eval_set("s", str(root)), ("zeroshot_classification", "linear_probe"))
    with pytest.raises(EvalDataError, match="is a classification set; zeroshot_retrieval needs captions"):
        tasks_for(open_eval_set("s", str(root)), ("zeroshot_retrieval",))
    (root / "classnames.txt").unlink()
    with pytest.raises(EvalDataError, match="classnames.txt is missing, so s is read as a retrieval set"):
        tasks_for(open_eval_set("s", str(root)), ("zeroshot_classification",))


def test_sets_at_fsspec_urls_read_like_local_ones(tmp_path):
    import fsspec

    root = write_classification_set(tmp_path, [[(k, k) for k in range(4)], [(5, 6)]])
    fs = fsspec.filesystem("memory")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.pipe(f"/evalset/{path.relative_to(root)}", path.read_bytes())
    try:
        [(_, _, metrics)] = evaluate("memory://evalset")
    finally:
        fs.rm("/evalset", recursive=True)
    assert metrics["acc1"] == 4 / 5


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def image_tree(root, folders, split="test"):
    for k, folder in enumerate(folders):
        (root / split / folder).mkdir(parents=True)
        (root / split / folder / "a.png").write_bytes(swatch(k % 8))
    return root


def names_by_folder(evalset, split="test"):
    """The class name each folder's images are labelled with."""
    return {url.split("/")[-2]: evalset.classnames[label] for url, label in evalset.units(split)}


def test_tree_class_names_map_by_folder_name_never_by_sorted_place(tmp_path):
    # folders zero..nine (sorted: eight, five, ...) with names listed in numeric order: mapped by name
    root = image_tree(tmp_path / "words", DIGITS)
    (root / "classnames.txt").write_text("\n".join(DIGITS) + "\n")
    assert names_by_folder(open_eval_set("digits", str(root))) == {d: d for d in DIGITS}
    # folders 0..9 with names zero..nine: an order that cannot be checked is refused ...
    root = image_tree(tmp_path / "numbers", [str(k) for k in range(10)])
    (root / "classnames.txt").write_text("\n".join(DIGITS) + "\n")
    with pytest.raises(EvalDataError, match=r"classnames\.txt lists class names that are not the class folders of "
                                            r".*its order cannot be checked.*Write one FOLDER<TAB>NAME line per class "
                                            r"folder \(e\.g\. '0<TAB>zero'\)"):
        open_eval_set("digits", str(root))
    # ... and mapped when written FOLDER<TAB>NAME, in any order
    (root / "classnames.txt").write_text("".join(f"{k}\t{DIGITS[k]}\n" for k in (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)))
    evalset = open_eval_set("digits", str(root))
    assert names_by_folder(evalset) == {str(k): d for k, d in enumerate(DIGITS)}
    (root / "classnames.txt").write_text("0\tzero\n1\n")
    with pytest.raises(EvalDataError, match=r"line '1' is not FOLDER<TAB>NAME"):
        open_eval_set("digits", str(root))
    (root / "classnames.txt").write_text("0\tzero\n1\tone\n")
    with pytest.raises(EvalDataError, match=r"names no class for the folders \['2', '3', '4', '5', '6'\]"):
        open_eval_set("digits", str(root))


def test_tree_zero_shot_accuracy_follows_the_names_in_any_order(tmp_path):
    folders = [name.replace(" ", "_") for name in CLASSNAMES]  # swatch_ash/ holds colour 0, ...
    root = image_tree(tmp_path, folders)
    (root / "classnames.txt").write_text("\n".join(reversed(CLASSNAMES)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    [(_, _, metrics)] = evaluate(root, name="reversed")
    assert metrics["acc1"] == 1.0


def test_tree_without_classnames_is_classified_by_its_folder_names(tmp_path):
    root = image_tree(tmp_path, [name.replace(" ", "_") for name in CLASSNAMES])
    evalset = open_eval_set("tree", str(root))
    assert evalset.kind == "classification" and evalset.classnames == tuple(CLASSNAMES)
    assert evalset.templates[0] == "itap of a {c}."  # open_clip's simple ImageNet templates
    [(_, _, metrics)] = evaluate(root, name="tree")
    assert metrics["acc1"] == 1.0


def test_split_folders_are_not_taken_as_classes(tmp_path):
    root = image_tree(tmp_path, ["train", "test"])  # ROOT/test/{train,test}/: a tree one level too high
    with pytest.raises(EvalDataError, match=r"test holds the split folders \['test', 'train'\], not class folders: "
                                            r"each would become a class; point the evaluation set at .*/test itself"):
        open_eval_set("s", str(root))
