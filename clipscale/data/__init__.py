"""Data: shard specs, the streaming WebDataset pipeline, safe decoding, the synthetic dataset."""
