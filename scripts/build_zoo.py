#!/usr/bin/env python3
"""Rebuild the demo zoo (evals/zoo/) and its suite data (evals/data/zoo_*.jsonl) on CPU.

    python3 scripts/build_zoo.py [--out evals/zoo] [--data evals/data] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.zoo import ZooConfig, build_zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="evals/zoo")
    ap.add_argument("--data", default="evals/data")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    build_zoo(args.out, args.data, ZooConfig(threads=args.threads))
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
