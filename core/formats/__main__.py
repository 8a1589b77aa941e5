"""`python -m core.formats`: print the format table; `--readme [PATH]` rewrites README.md's block;
`--check` exits 1 when that block is out of date."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.formats import readme_block, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, nargs="?", const=Path("README.md"), help="rewrite its block")
    parser.add_argument("--check", action="store_true", help="with --readme: fail if the block is out of date")
    args = parser.parse_args(argv)
    if args.readme is None:
        print(table())
        return 0
    text = args.readme.read_text(encoding="utf-8")
    new = readme_block(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the dataset-format table is out of date: run `python -m core.formats --readme`",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new, encoding="utf-8")
    print(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
