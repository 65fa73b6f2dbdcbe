"""clipscale: distributed contrastive image-text pretraining and scaling-law studies."""

__version__ = "0.1.0"
