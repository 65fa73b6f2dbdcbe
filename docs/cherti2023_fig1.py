"""Fig. 1 of Cherti et al. 2023 ("Reproducible scaling laws for contrastive language-image learning")
drawn by clipscale from their public results table: zero-shot ImageNet error and the ImageNet
robustness average against compute, OpenCLIP (LAION, binned frontier) and OpenAI CLIP (WIT, every
model), with 95% bootstrap bands.

    python docs/cherti2023_fig1.py docs/scaling_cherti2023_fig1.png
"""
import sys
from pathlib import Path

from matplotlib.figure import Figure

from clipscale import scaling
from clipscale.scaling.plot import draw_fit

TABLE = Path(__file__).parents[1] / "tests" / "data" / "cherti2023_zeroshot.csv"
PANELS = {"imagenet1k": "ImageNet", "imagenet_robustness": "ImageNet robustness (average of 5 shifts)"}


def fig1_fits(table: Path = TABLE, *, n_bootstrap: int = 400) -> dict[str, dict[str, scaling.Fit]]:
    """{eval_dataset: {"OpenCLIP": fit, "OpenAI": fit}} as the paper fits them."""
    df = scaling.load_results(table)
    wit = df["dataset"] == "CLIP-WIT"
    return {ev: {"OpenCLIP": scaling.fit(df[~wit], metric="acc1", eval_dataset=ev, frontier="bins:5",
                                         n_bootstrap=n_bootstrap)[0],
                 "OpenAI": scaling.fit(df[wit], metric="acc1", eval_dataset=ev, frontier="none",
                                       n_bootstrap=n_bootstrap)[0]}
            for ev in PANELS}


def draw(out: Path, *, n_bootstrap: int = 400) -> Path:
    fig = Figure(figsize=(11.0, 4.4), dpi=110)
    for ax, (ev, fits) in zip(fig.subplots(1, 2), fig1_fits(n_bootstrap=n_bootstrap).items()):
        for (name, f), color in zip(fits.items(), ("tab:orange", "tab:blue")):
            draw_fit(f, ax, color=color, label=f"{name}: {f.formula}")
        ax.set_title(PANELS[ev], fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Cherti et al. 2023, Fig. 1, refitted by clipscale (zeroshot_results.csv of "
                 "LAION-AI/scaling-laws-openclip)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    return out


if __name__ == "__main__":
    draw(Path(sys.argv[1]))
