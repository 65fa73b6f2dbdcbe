"""`inspect`: look at shards before training on them.

Reads samples in shard order (up to `max_samples`) with the loader's reader; image sizes come from
headers only. Writes `contact_sheet.png` (the first `n` good samples with their captions),
`histograms.png` (image sides, aspect ratios, caption lengths) and `summary.json`.
"""
from __future__ import annotations

import collections
import logging
import posixpath
import textwrap
from typing import Any

import fsspec
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from clipscale.data.decode import open_image, to_rgb  # noqa: E402
from clipscale.data.shards import BadSample, caption_text  # noqa: E402
from clipscale.data_tools.shardio import read_shard, write_json  # noqa: E402

log = logging.getLogger(__name__)
THUMB_PX = 160


def collect(urls: list[str], *, caption: str, n: int, max_samples: int) -> dict[str, Any]:
    """Sizes and caption lengths of up to `max_samples` samples, thumbnails of the first `n`, bad counts."""
    counters: collections.Counter = collections.Counter()
    stats: dict[str, list] = {"widths": [], "heights": [], "caption_chars": [], "sheet": []}
    samples = (sample for url in urls for sample in read_shard(url, caption=caption, counters=counters))
    for sample in tqdm(samples, desc="inspect", unit="sample", disable=None):
        if len(stats["widths"]) >= max_samples:
            break
        try:
            text = caption_text(sample["caption"], caption=caption)
            img = open_image(sample["image"])
            if len(stats["sheet"]) < n:
                thumb = to_rgb(img)  # decodes: a truncated image fails here
                thumb.thumbnail((THUMB_PX, THUMB_PX))
                stats["sheet"].append((sample["__key__"], text, thumb))
        except BadSample as e:
            counters[e.reason] += 1
            continue
        except OSError:
            counters["corrupt_image"] += 1
            continue
        stats["widths"].append(img.size[0])
        stats["heights"].append(img.size[1])
        stats["caption_chars"].append(len(text))
    return {**stats, "bad": dict(counters)}


def contact_sheet(sheet: list[tuple[str, str, Any]], path: str) -> None:
    """A grid of thumbnails, each titled with its key and wrapped caption."""
    cols = min(4, max(1, len(sheet)))
    rows = max(1, -(-len(sheet) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, text, thumb) in zip(axes.flat, sheet):
        ax.imshow(np.asarray(thumb))
        ax.set_title(f"{key}\n" + "\n".join(textwrap.wrap(text, 34)[:3]), fontsize=7)
    _save(fig, path)


def histograms(stats: dict[str, Any], path: str) -> None:
    """Image sides, aspect ratios (width / height) and caption lengths (characters)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].hist([stats["widths"], stats["heights"]], bins=30, label=["width", "height"])
    axes[0].set(xlabel="pixels", ylabel="samples", title="image sides")
    axes[0].legend()
    axes[1].hist(np.divide(stats["widths"], np.maximum(stats["heights"], 1)), bins=30)
    axes[1].set(xlabel="width / height", title="aspect ratio")
    axes[2].hist(stats["caption_chars"], bins=30)
    axes[2].set(xlabel="characters", title="caption length")
    _save(fig, path)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), (round(float(v), 3) for v in q)))


def inspect_shards(urls: list[str], out: str, *, caption: str = "txt", n: int = 16,
                   max_samples: int = 10_000) -> dict[str, Any]:
    """Write the contact sheet, histograms and summary into `out`; returns the summary."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    stats = collect(urls, caption=caption, n=n, max_samples=max_samples)
    contact_sheet(stats["sheet"], posixpath.join(out, "contact_sheet.png"))
    histograms(stats, posixpath.join(out, "histograms.png"))
    aspect = list(np.divide(stats["widths"], np.maximum(stats["heights"], 1)))
    summary = {"shards": len(urls), "samples_read": len(stats["widths"]), "bad": stats["bad"],
               "width": describe(stats["widths"]), "height": describe(stats["heights"]),
               "aspect_ratio": describe(aspect), "caption_chars": describe(stats["caption_chars"])}
    write_json(posixpath.join(out, "summary.json"), summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a text table: one row per measured quantity, then the bad counts."""
    columns = ("min", "p5", "median", "p95", "max")
    lines = [f"{summary['samples_read']:,} samples read from {summary['shards']} shards",
             f"{'':<14}" + "".join(f"{c:>9}" for c in columns)]
    for name in ("width", "height", "aspect_ratio", "caption_chars"):
        lines.append(f"{name:<14}" + "".join(f"{summary[name].get(c, float('nan')):>9.4g}" for c in columns))
    lines += [f"bad {reason}: {n}" for reason, n in sorted(summary["bad"].items())]
    return "\n".join(lines)
