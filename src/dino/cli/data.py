"""``dino shards``: an image folder written as WebDataset tar shards, for training from ``data.path``."""

from __future__ import annotations

import argparse
import time

from dino.cli.arguments import ONE
from dino.cli.output import write_results
from dino.data.shards import SHARD_INDEX, shard_pattern, write_shards


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino shards``."""
    p = sub.add_parser(
        "shards",
        help="write an image folder as WebDataset tar shards",
        description="Copies every image file under SRC_DIR (its bytes, not re-encoded) into OUT_DIR/shard-000000.tar, "
        f"shard-000001.tar… of --shard-size samples each, with the class index when SRC_DIR has class "
        f"sub-folders, and OUT_DIR/{SHARD_INDEX} (sample counts and class names). Train from them with "
        "data.path='OUT_DIR/shard-{000000..000099}.tar' (the pattern is printed). Needs the webdataset package "
        "(pip install 'dino[shards]').",
    )
    p.add_argument("src_dir", metavar="SRC_DIR", help="image folder (class sub-folders give labels)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the order the images are written in (default 0)"
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="write the images in the folder's sorted order (shards then hold one class each)",
    )
    p.add_argument("--output", metavar="FILE", help="also write the summary as JSON")
    p.set_defaults(func=run_shards, processes=ONE)


def run_shards(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    shards = write_shards(args.src_dir, args.out_dir, args.shard_size, None if args.keep_order else args.seed)
    results = {
        "data.path": shard_pattern(args.out_dir, len(shards.urls)),
        "shards": len(shards.urls),
        "samples": len(shards),
        "classes": len(shards.classes),
        "seconds": time.perf_counter() - start,
    }
    write_results(results, args.output, f"WebDataset shards of {args.src_dir}")
    return 0
