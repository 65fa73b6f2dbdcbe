"""Evaluation on 2 gloo ranks (each encoding its own shards, each passing half of every held-out loss batch)
== one process; data errors reach every rank."""
import os

import pytest
import torch
import torch.distributed as dist

from clipscale.config import EvalConfig
from clipscale.evaluate.datasets import EvalDataError, open_eval_set
from clipscale.evaluate.runner import evaluate_model
from tests.eval_kit import CLASSNAMES, tiny_open_clip, write_classification_set, write_retrieval_set
from tests.helpers import spawn_ranks

pytestmark = pytest.mark.slow
# No decode workers: under mp.spawn each would start a fresh interpreter (the unit tests cover workers).
CFG = EvalConfig(tasks=("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "contrastive_loss"),
                 batch_size=4, num_workers=0, loss_batch_size=4)


def write_sets(root) -> dict[str, str]:
    labelled = [(i % 8, (i * 3) % 8) for i in range(40)]  # labels unrelated to colour: a random model's job
    shards = [labelled[:7], labelled[7:9], labelled[9:23]]  # uneven: rank 0 reads shards 0 and 2
    write_classification_set(root / "cls", shards)
    write_classification_set(root / "cls", [labelled[:20], labelled[20:]], split="train")
    captions = [(k % 8, [f"a {CLASSNAMES[k % 8]}", f"{CLASSNAMES[(k + 1) % 8]} or so"][: 1 + k % 2]) for k in range(11)]
    write_retrieval_set(root / "ret", [captions[:5], captions[5:6], captions[6:]])
    write_classification_set(root / "bad", [[(0, 0)], [(1, 1), (2, 99)]])  # the error is in rank 1's shard
    return {name: str(root / name) for name in ("cls", "ret", "bad")}


def evaluate(paths: dict[str, str]) -> dict:
    model, preprocess, tokenizer = tiny_open_clip(seed=0)
    sets = [open_eval_set("cls", paths["cls"]), open_eval_set("ret", paths["ret"])]
    out = {f"{task}/{s.name}": metrics for task, s, metrics in evaluate_model(
        model, tokenizer=tokenizer, preprocess=preprocess, sets=sets, cfg=CFG, device=torch.device("cpu"))}
    try:
        list(evaluate_model(model, tokenizer=tokenizer, preprocess=preprocess,
                            sets=[open_eval_set("bad", paths["bad"])], device=torch.device("cpu"),
                            cfg=EvalConfig(tasks=("zeroshot_classification",), batch_size=4, num_workers=0)))
    except EvalDataError as e:
        out["error"] = str(e)
    return out


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        paths = {name: os.path.join(out_dir, name) for name in ("cls", "ret", "bad")}
        torch.save(evaluate(paths), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    paths = write_sets(tmp_path)
    single = evaluate(paths)
    ranks = spawn_ranks(worker, tmp_path, world=2)
    assert set(single) == {"zeroshot_classification/cls", "linear_probe/cls", "zeroshot_retrieval/ret",
                           "contrastive_loss/ret", "error"}
    for result in ranks:
        assert result.keys() == single.keys()
        for key in single:
            if key != "error":
                assert result[key] == pytest.approx(single[key], abs=1e-12), key
        assert "1.tar:000000002.cls: class 99 is outside [0, 8)" in result["error"]
    assert single["zeroshot_retrieval/ret"]["text_retrieval_recall@10"] < 1  # not trivially saturated
