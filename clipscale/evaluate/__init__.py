"""Evaluation: zero-shot classification, retrieval and linear probes into the long results table.

datasets.py reads sets in CLIP_benchmark's layouts, features.py encodes them sharded over ranks,
zeroshot.py / retrieval.py / linear_probe.py compute the metrics, results.py owns results.jsonl
and runner.py ties targets (runs, checkpoints, open_clip weights) to all of these.
"""
