"""`inspect`: contact sheet and histograms as PNGs, and a summary of sizes, captions and bad samples."""
import json

from PIL import Image

from clipscale.data_tools.inspect_shards import inspect_shards, summary_table
from tests.shard_kit import image_bytes, write_shard


def test_inspect_writes_pngs_and_a_summary(tmp_path):
    members = []
    for i in range(6):
        members += [(f"k{i}.png", image_bytes(i, size=10 + 2 * i, fmt="PNG")), (f"k{i}.txt", b"x" * (i + 1))]
    members += [("bad.jpg", b"not an image"), ("bad.txt", b"caption")]
    shard = write_shard(tmp_path / "a.tar", members)
    summary = inspect_shards([str(shard)], str(tmp_path / "report"), n=4, max_samples=5)
    for name in ("contact_sheet.png", "histograms.png"):
        with Image.open(tmp_path / "report" / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    assert summary["samples_read"] == 5 and summary["bad"] == {}  # stopped before the bad sample
    assert summary["width"]["min"] == 10 and summary["width"]["max"] == 18
    assert summary["caption_chars"]["median"] == 3
    assert json.loads((tmp_path / "report/summary.json").read_text()) == summary
    full = inspect_shards([str(shard)], str(tmp_path / "full"), n=2)
    assert full["samples_read"] == 6 and full["bad"] == {"not_an_image": 1}
    assert "bad not_an_image: 1" in summary_table(full)
