"""Evaluation (zero-shot classification, retrieval, linear probes, held-out losses) into the long results table.

datasets.py reads sets in CLIP_benchmark's layouts, features.py encodes them sharded over ranks,
zeroshot.py / retrieval.py / linear_probe.py / heldout_loss.py compute the metrics, and runner.py
ties targets (runs, checkpoints, open_clip weights, runs still training) to all of these and
appends the rows through `clipscale.results`, the table's one owner.
"""
