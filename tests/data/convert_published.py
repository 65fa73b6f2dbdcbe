"""Convert published scaling tables to clipscale's long results schema (how tests/data/*.csv were made).

    python tests/data/convert_published.py cherti2023 SCALING_LAWS_OPENCLIP_CHECKOUT tests/data/cherti2023_zeroshot.csv
    python tests/data/convert_published.py chinchilla ANALYZING_CHINCHILLA_CHECKOUT tests/data/chinchilla_fig4.csv

Sources and licences: tests/data/README.md.
"""
import sys
from pathlib import Path

import pandas as pd

CHERTI_METRICS = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@5", "text_retrieval_recall@5",
                  "mean_average_precision")


def cherti2023(repo: Path) -> pd.DataFrame:
    """zeroshot_results.csv (one row per model and eval set, a column per metric) + arch_info.csv (params)."""
    wide = pd.read_csv(repo / "zeroshot_results.csv")
    params = pd.read_csv(repo / "arch_info.csv").set_index("model")["mparams"] * 1e6  # image + text towers
    run = wide["name"].str.removesuffix(".pt").where(wide["name"] != "openai", "openai-" + wide["arch"])
    base = pd.DataFrame({"run": run, "model": wide["arch"], "samples_seen": wide["samples_seen"],
                         "params": wide["arch"].map(params).round().astype("int64"),
                         "gmacs_per_sample": wide["gmacs"], "compute_gmacs": wide["gmacs_total"],
                         "dataset": wide["upstream_dataset"], "task": wide["task"],
                         "eval_dataset": wide["downstream_dataset"]})
    long = [base.assign(metric=m, value=wide[m])[wide[m].notna()] for m in CHERTI_METRICS]
    return pd.concat(long).sort_index(kind="stable").reset_index(drop=True)


def chinchilla(repo: Path) -> pd.DataFrame:
    """data/svg_extracted_data.csv: model size, training FLOP and loss of each point of Hoffmann et al. Fig. 4;
    tokens D = FLOP / (6 N) as in the analysis notebook; forward MACs per token ~ N (2N FLOPs)."""
    points = pd.read_csv(repo / "data" / "svg_extracted_data.csv")[["Model Size", "Training FLOP", "loss"]].dropna()
    n, flop = points["Model Size"], points["Training FLOP"]
    return pd.DataFrame({"model": "chinchilla-fig4", "samples_seen": flop / (6.0 * n), "params": n,
                         "gmacs_per_sample": n / 1e9, "compute_gmacs": flop / 6.0 / 1e9, "dataset": "MassiveText",
                         "task": "language_modeling", "eval_dataset": "massivetext", "metric": "loss",
                         "value": points["loss"]})


if __name__ == "__main__":
    kind, repo, out = sys.argv[1:]
    {"cherti2023": cherti2023, "chinchilla": chinchilla}[kind](Path(repo)).to_csv(out, index=False)
