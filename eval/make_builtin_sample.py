"""Regenerate the calibration sample shipped inside the package (lowrank_attn/data/gutenberg/):
32 KB of each of the eight public-domain Gutenberg novels in ../shared/data, taken from 20% into the
book and cut at paragraph boundaries. Run from the repository root: python eval/make_builtin_sample.py"""

import argparse
from pathlib import Path

SRC = Path("../shared/data")
DST = Path("lowrank_attn/data/gutenberg")
SIZE = 32 * 1024


def excerpt(text: str) -> str:
    start = text.find("\n\n", int(0.2 * len(text))) + 2
    stop = text.rfind("\n\n", start, start + SIZE)
    return text[start:stop].strip() + "\n"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    DST.mkdir(parents=True, exist_ok=True)
    for f in sorted(SRC.glob("gutenberg-*.txt")):
        out = DST / (f.stem.removeprefix("gutenberg-") + ".txt")
        out.write_text(excerpt(f.read_text(encoding="utf-8")), encoding="utf-8")
        print(out, out.stat().st_size)


if __name__ == "__main__":
    main()
