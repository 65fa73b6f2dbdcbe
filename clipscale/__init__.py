"""clipscale: distributed contrastive image-text pretraining and scaling-law studies."""

__version__ = "0.1.0"


def load(target, *, device="cpu"):
    """(model, preprocess, tokenizer) of a run directory (its latest checkpoint), a checkpoint directory
    or a `clipscale export` directory: the model in eval mode, PIL image -> tensor, list of str -> tokens.

    Imported on use, so that `import clipscale` (and the CLI) stays free of torch.
    """
    from clipscale.export import load as load_target

    return load_target(target, device=device)
