"""python3 -m vcpud.manpages OUTDIR: write vcpud.8 and vcpud.yaml.5 into OUTDIR."""

import sys
from pathlib import Path

from . import ManpageError, write


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python3 -m vcpud.manpages OUTDIR", file=sys.stderr)
        return 2
    try:
        for path in write(Path(argv[0])):
            print(path)
    except ManpageError as e:
        print(f"vcpud.manpages: {e}", file=sys.stderr)
        return 1
    return 0


sys.exit(main(sys.argv[1:]))
