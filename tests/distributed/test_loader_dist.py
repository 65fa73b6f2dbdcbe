"""The loader on 2 gloo ranks x 2 workers: same batches as 1 process, exact resume, across world sizes."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port
from tests.shard_kit import write_dataset
from tests.unit.test_pipeline import UNEVEN, keys, make_loader, take

STEPS, SAVE_AT = 14, 5


def run_job(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "tests/distributed/loader_job.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(args[1].read_text())


@pytest.mark.slow
@pytest.mark.parametrize("resampled", [False, True])
def test_two_ranks_match_one_process_and_resume_exactly(tmp_path, resampled):
    spec = write_dataset(tmp_path / "shards", UNEVEN)
    flag = int(resampled)
    reference = keys(take(make_loader(spec, resampled=resampled, block_shards=1), STEPS))
    full = run_job(2, spec, tmp_path / "full.json", STEPS, flag, "", SAVE_AT)
    assert full["batches"] == reference
    state = tmp_path / "state.json"
    state.write_text(json.dumps(full["state"]))
    for nproc in (2, 1):  # resume on the same and on a different world size
        tail = run_job(nproc, spec, tmp_path / f"tail{nproc}.json", STEPS - SAVE_AT, flag, state)
        assert tail["batches"] == reference[SAVE_AT:]
    if not resampled:  # one exact epoch: every sample at most once
        epoch = make_loader(spec).plan.quota(0) * 4 // 8
        seen = [k for batch in reference[:epoch] for k in batch]
        assert len(seen) == len(set(seen))
