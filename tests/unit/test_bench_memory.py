"""The CPU live-tensor peak used by the memory benchmarks."""
import torch

from benchmarks.memory import peak_tensor_bytes

MIB = 2**20


def test_peak_tensor_bytes_counts_tensors_alive_at_once():
    def sequential():
        for _ in range(3):
            torch.ones(MIB, dtype=torch.uint8)  # freed before the next one

    def together():
        kept = [torch.ones(MIB, dtype=torch.uint8) for _ in range(3)]
        return sum(int(t[0]) for t in kept)

    assert MIB <= peak_tensor_bytes(sequential) < 1.5 * MIB
    assert 3 * MIB <= peak_tensor_bytes(together) < 3.5 * MIB


def test_peak_tensor_bytes_ignores_what_was_alive_before():
    before = torch.ones(8 * MIB, dtype=torch.uint8)
    assert peak_tensor_bytes(lambda: before.sum()) < MIB
