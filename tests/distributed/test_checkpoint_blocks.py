"""Activation checkpointing under FSDP2 bf16: a block is recomputed in backward on the same bf16 input
it ran on in forward (a checkpoint outside the FSDP2 unit recomputes on the saved fp32 input, which
CUDA's layer norm refuses; CPU's mixed-dtype kernels would hide that, so the dtype itself is checked)."""
import torch
import torch.distributed as dist

from clipscale.config import load_config
from clipscale.dist import DistInfo
from clipscale.models import build_model
from clipscale.parallel import parallelize, transformer_blocks
from tests.helpers import free_port


def test_fsdp_bf16_blocks_are_recomputed_on_bf16_inputs():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cfg = load_config(None, ["train.parallel=fsdp", "train.precision=bf16", "train.grad_checkpointing=true"])
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        model = bundle.model
        blocks = transformer_blocks(model)
        seen: list[tuple[bool, torch.dtype]] = []
        for block in blocks:
            block.ln_1.register_forward_pre_hook(
                lambda _m, args: seen.append((torch.is_grad_enabled(), args[0].dtype)))
        model = parallelize(model, cfg.train, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        images = torch.randn(2, 3, bundle.image_size, bundle.image_size)
        texts = bundle.tokenizer(["a red square", "a blue circle"])
        out = model(images, texts)
        forward = len(seen)
        (out["image_features"].float().sum() + out["text_features"].float().sum()).backward()
        assert forward == len(blocks) and len(seen) == 2 * len(blocks)  # every block ran again in backward
        assert {dtype for _, dtype in seen} == {torch.bfloat16}, seen
    finally:
        dist.destroy_process_group()
