"""clipscale's data tools: make, validate, inspect, size and reshard image-text WebDataset shards.

    clipscale data <verb> ...   (or: python -m clipscale.data_tools <verb> ...)

Verbs: sizes, make, validate, inspect, reshard, synth, eval-set; `--help` on each for its options.
"""
