"""Small open_clip models for tests and the gradient-cache benchmark, built offline."""
import open_clip
import torch


def tiny_clip(*, width: int = 32, layers: int = 2, embed_dim: int = 16, image_size: int = 16,
              patch_size: int = 4, context_length: int = 8, vocab_size: int = 100, head_width: int = 16,
              dropout: float = 0.0, patch_dropout: float = 0.0, logit_bias: float | None = None,
              ) -> torch.nn.Module:
    """A small open_clip `CLIP` (ViT + text transformer) built offline, `output_dict=True`.

    open_clip's native towers expose only patch dropout, so `dropout` is added where it acts in
    real models: attention-probability dropout and an MLP output dropout in every block of both
    towers. Tests use it with all dropouts on to check that gradient caching replays the masks.
    """
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, output_dict=True, embed_dim=embed_dim, init_logit_bias=logit_bias,
        vision_cfg={"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                    "head_width": head_width, "patch_dropout": patch_dropout},
        text_cfg={"context_length": context_length, "vocab_size": vocab_size, "width": width,
                  "heads": max(1, width // head_width), "layers": layers},
    )
    if dropout > 0:
        for tower in (model.visual.transformer, model.transformer):
            for block in tower.resblocks:
                block.attn.dropout = dropout  # nn.MultiheadAttention reads this at every forward
                block.mlp.add_module("drop", torch.nn.Dropout(dropout))
    return model

