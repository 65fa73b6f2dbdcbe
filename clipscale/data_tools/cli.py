"""`clipscale data <verb>`: prepare image-text WebDataset shards for training and evaluation.

    clipscale data make images/ shards/ --captions captions.csv --shard-mb 500 --max-side 512
    clipscale data validate 'shards/{000000..000009}.tar' --fix clean/
    clipscale data inspect shards/ report/
    clipscale data sizes img2dataset_out/
    clipscale data reshard 'shards/{000000..000099}.tar' resharded/ --shards 64 --val-fraction 0.01
    clipscale data eval-set imagenet_val/ evalsets/imagenet
    clipscale data synth data/synthetic

A SHARDS argument is written as data.train_shards is: a directory of `*.tar` (e.g. img2dataset output),
a glob (`shards/*.tar`) or a brace spec; any fsspec URL. `validate` exits 1 if a sample is bad and
nothing was fixed, 0 once `--fix` wrote the clean shards.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

from clipscale.data.shards import DataError

log = logging.getLogger(__name__)


def cmd_sizes(args: argparse.Namespace) -> int:
    from clipscale.data_tools.shardio import list_shards
    from clipscale.data_tools.sizes import write_sizes

    sizes = write_sizes(list_shards(args.shards), caption=args.caption, count=args.count, processes=args.processes)
    print(f"{len(sizes)} shards, {sum(sizes.values()):,} samples; sizes.json written next to them")
    return 0


def cmd_make(args: argparse.Namespace) -> int:
    from clipscale.data_tools.make import ShardTarget, make_shards
    from clipscale.data_tools.shardio import write_json

    target = ShardTarget(samples_per_shard=args.samples_per_shard, shard_mb=args.shard_mb,
                         max_side=args.max_side, quality=args.quality)
    summary = make_shards(args.images, args.out, target=target, captions=args.captions,
                          path_column=args.path_column, caption_column=args.caption_column, processes=args.processes)
    if args.report:
        write_json(args.report, summary)
    out = args.out.rstrip("/") or args.out
    print(f"{summary['shards']} shards, {summary['samples']:,} samples in {out}; "
          f"skipped: {summary['failed'] or 'none'}")
    for source, reason in summary["skipped"][: args.show]:
        print(f"skipped: {source} {reason}")
    print(train_hint(out, summary["shards"]))
    return 0


def train_hint(spec: str, shards: int) -> str:
    """How to train on shards just written: the spec, and the stream bound the shard count sets."""
    return (f"train on them: clipscale train RECIPE data.train_shards={spec}  ({shards} shards: data.num_streams "
            f"follows them when the recipe leaves it unset, and must not exceed {shards} when it sets it)")


def cmd_validate(args: argparse.Namespace) -> int:
    from clipscale.data_tools.shardio import list_shards, write_json
    from clipscale.data_tools.validate import summary_table, validate_shards

    report = validate_shards(list_shards(args.shards), caption=args.caption, fix_dir=args.fix,
                             processes=args.processes)
    if args.report:
        write_json(args.report, report)
    print(summary_table(report))
    for shard in report["shards"]:
        for key, reason in shard["bad"][: args.show]:
            print(f"bad: {shard['url']} {key} {reason}")
    return 1 if report["bad"] and not args.fix else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from clipscale.data_tools.inspect_shards import inspect_shards, summary_table
    from clipscale.data_tools.shardio import list_shards

    summary = inspect_shards(list_shards(args.shards), args.out, caption=args.caption, n=args.n,
                             max_samples=args.max_samples)
    print(summary_table(summary))
    print(f"written: {args.out}/contact_sheet.png, histograms.png, summary.json")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from clipscale.data_tools.reshard import reshard
    from clipscale.data_tools.shardio import list_shards

    result = reshard(list_shards(args.shards), args.out, shards=args.shards_out, val_fraction=args.val_fraction,
                     seed=args.seed, caption=args.caption, drop_duplicate_images=not args.keep_duplicate_images,
                     processes=args.processes)
    for split, sizes in result["splits"].items():
        print(f"{split or 'shards'}: {len(sizes)} shards, {sum(sizes):,} samples ({min(sizes)}-{max(sizes)} each)")
    print(f"dropped: {json.dumps(result['dropped']) if result['dropped'] else 'none'}")
    train, out = "train" if "train" in result["splits"] else "", args.out.rstrip("/") or args.out
    print(train_hint(f"{out}/{train}" if train else out, len(result["splits"][train])))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from clipscale.data.synthetic import write_synthetic_dataset

    specs = write_synthetic_dataset(args.out, train_samples=args.train_samples,
                                    samples_per_shard=args.samples_per_shard, zeroshot_samples=args.zeroshot_samples,
                                    image_size=args.image_size, seed=args.seed, processes=args.processes)
    for name, spec in specs.items():
        print(f"{name}: {spec}")
    return 0


def cmd_eval_set(args: argparse.Namespace) -> int:
    from clipscale.data_tools.evalset import classification_items, read_templates, retrieval_items, shard_items, write_eval_set
    from clipscale.data_tools.shardio import is_shards, list_shards

    templates = read_templates(args.templates) if args.templates else None
    write = {"out": args.out, "split": args.split, "samples_per_shard": args.samples_per_shard,
             "max_side": args.max_side, "processes": args.processes}
    if is_shards(args.images):
        summary = write_eval_set(shard_items(list_shards(args.images), caption=args.caption), label="txt", **write)
    elif args.captions:
        items = retrieval_items(args.images, args.captions, path_column=args.path_column,
                                caption_column=args.caption_column)
        summary = write_eval_set(items, label="txt", **write)
    else:
        items, classnames = classification_items(args.images)
        summary = write_eval_set(items, label="cls", classnames=classnames, templates=templates, **write)
    print(f"{summary['samples']:,} samples in {summary['shards']} shards under {args.out}/{args.split}; "
          f"skipped: {summary['skipped'] or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscale data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from clipscale.cli import HelpFormatter

    sub = parser.add_subparsers(dest="verb", required=True)
    verb = functools.partial(sub.add_parser, formatter_class=HelpFormatter)
    processes = {"type": int, "default": os.cpu_count() or 1, "help": "worker processes (default: all cores)"}
    caption = {"default": "txt", "help": "caption member: txt, or json:FIELD for a field of key.json"}

    p = verb("sizes", help="write sizes.json (from img2dataset's *_stats.json, else by counting)")
    p.add_argument("shards", help="a directory of *.tar or a brace spec")
    p.add_argument("--count", action="store_true", help="count samples even where *_stats.json exists")
    p.add_argument("--caption", **caption)
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_sizes)

    p = verb("make", help="shards from an image folder and captions")
    p.add_argument("images", help="image folder (captions from --captions, else from IMAGE_STEM.txt beside each)")
    p.add_argument("out", help="output directory (new, or an interrupted make to resume)")
    p.add_argument("--captions", help="captions table: .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--path-column", default="path", help="table column with image paths (relative to IMAGES)")
    p.add_argument("--caption-column", default="caption", help="table column with captions")
    p.add_argument("--samples-per-shard", type=int, metavar="N", default=10_000, help="samples per output shard")
    p.add_argument("--shard-mb", type=float, help="also cut shards at this size in MB")
    p.add_argument("--max-side", type=int, help="resize images larger than this many pixels on their long side")
    p.add_argument("--quality", type=int, help="re-encode every image as JPEG at this quality")
    p.add_argument("--report", help="write the summary with every skipped input and its reason as JSON here")
    p.add_argument("--show", type=int, default=5, help="skipped inputs listed")
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_make)

    p = verb("validate", help="decode every sample as the loader would; count the bad ones (exit status 1 "
                              "if any is bad, unless --fix wrote clean shards)")
    p.add_argument("shards", help="a directory of *.tar, a glob or a brace spec")
    p.add_argument("--fix", metavar="OUT", help="write the good samples to shards of the same names in OUT")
    p.add_argument("--report", help="write the full report (every bad key and reason) as JSON here")
    p.add_argument("--show", type=int, default=5, help="bad samples listed per shard")
    p.add_argument("--caption", **caption)
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_validate)

    p = verb("inspect", help="contact sheet, histograms and a summary table of some samples")
    p.add_argument("shards", help="a directory of *.tar or a brace spec")
    p.add_argument("out", help="directory for contact_sheet.png, histograms.png, summary.json")
    p.add_argument("-n", type=int, default=16, help="samples on the contact sheet")
    p.add_argument("--max-samples", type=int, default=10_000, help="samples read for the histograms")
    p.add_argument("--caption", **caption)
    p.set_defaults(func=cmd_inspect)

    p = verb("reshard", help="N shards -> M balanced, globally shuffled shards, deduplicated")
    p.add_argument("shards", help="a directory of *.tar or a brace spec")
    p.add_argument("out", help="output directory (new, or an interrupted reshard to resume)")
    p.add_argument("--shards", dest="shards_out", type=int, required=True, help="output shards (train + val)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of keys (by hash) in OUT/val")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    p.add_argument("--keep-duplicate-images", action="store_true",
                   help="keep byte-identical images under different keys (one image, several captions)")
    p.add_argument("--caption", **caption)
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_reshard)

    p = verb("synth", help="the embedded synthetic dataset (train shards + zero-shot set)")
    p.add_argument("out", help="output directory (train/ shards and the zeroshot/ set)")
    p.add_argument("--train-samples", type=int, default=64_000, help="training image-text pairs")
    p.add_argument("--samples-per-shard", type=int, metavar="N", default=4_000, help="samples per training shard")
    p.add_argument("--zeroshot-samples", type=int, default=2_000, help="images of the zero-shot set")
    p.add_argument("--image-size", type=int, default=64, help="side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawings")
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_synth)

    p = verb("eval-set", help="zero-shot classification (ImageFolder) or retrieval (captions table) set "
                                        "in CLIP_benchmark's WebDataset layout")
    p.add_argument("images", help="ImageFolder tree (IMAGES/CLASS/*.jpg), the image folder of --captions, "
                                  "or image-text shards (a directory of *.tar or a spec): a retrieval set")
    p.add_argument("out", help="output directory: the set's root")
    p.add_argument("--captions", help="captions table: makes a retrieval set (image + .txt captions)")
    p.add_argument("--path-column", default="path", help="table column with image paths (relative to IMAGES)")
    p.add_argument("--caption-column", default="caption", help="table column with captions")
    p.add_argument("--templates", help="file of prompt templates with {c}, one per line (default: open_clip's)")
    p.add_argument("--split", default="test", help="split folder written under OUT (test, or train for linear probes)")
    p.add_argument("--samples-per-shard", type=int, metavar="N", default=10_000, help="samples per output shard")
    p.add_argument("--max-side", type=int, help="resize images larger than this many pixels on their long side")
    p.add_argument("--caption", **caption)
    p.add_argument("--processes", **processes)
    p.set_defaults(func=cmd_eval_set)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one data verb; bad input exits with status 2 and a message naming the file or value."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("clipscale.data_tools").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"clipscale data: error: {e}", file=sys.stderr)
        return 2
