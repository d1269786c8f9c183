"""The man pages vcpud(8) and vcpud.yaml(5), generated from the prose in this package.

``python3 -m vcpud.manpages OUTDIR`` writes OUTDIR/vcpud.8 and OUTDIR/vcpud.yaml.5. Standard
library only (packaging builds run it with the distribution's python3); the output depends on
nothing but the code and SOURCE_DATE_EPOCH, so builds are reproducible.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .. import __version__

# The date each version's pages carry when SOURCE_DATE_EPOCH is not set (never the build's
# own date: the same source must give the same pages). A new version needs its line here;
# tests/test_manpages.py fails until it has one.
RELEASE_DATES = {
    "0.1.0": "2026-12-02",
}
PAGES = ("vcpud.8", "vcpud.yaml.5")


class ManpageError(ValueError):
    """A bad SOURCE_DATE_EPOCH or output directory; the message says which and why."""


def page_date(environ: dict[str, str] | None = None, version: str = __version__) -> str:
    """YYYY-MM-DD: SOURCE_DATE_EPOCH's day in UTC if it is set, else the version's release date."""
    env = os.environ if environ is None else environ
    epoch = env.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch != "":
        if not epoch.isdigit() or len(epoch) > 12:
            raise ManpageError(f"SOURCE_DATE_EPOCH must be seconds since 1970 (decimal digits), got {epoch[:40]!r}")
        return time.strftime("%Y-%m-%d", time.gmtime(int(epoch)))
    return RELEASE_DATES.get(version, "")


def render_all(date: str, version: str = __version__) -> dict[str, str]:
    """Page file name -> roff text."""
    from ..cli import build_parser  # argparse and the standard library only, as the pages need
    from . import vcpud8, vcpud_yaml5

    return {"vcpud.8": vcpud8.render(build_parser(), date, version), "vcpud.yaml.5": vcpud_yaml5.render(date, version)}


def write(outdir: Path, date: str | None = None) -> list[Path]:
    """Write every page into ``outdir`` (created if missing), mode 0644 whatever the umask."""
    pages = render_all(page_date() if date is None else date)
    if not outdir.is_dir():
        try:
            outdir.mkdir(parents=True)
            os.chmod(outdir, 0o755)
        except OSError as e:
            raise ManpageError(f"cannot create {outdir}: {e.strerror or e}") from None
    written = []
    for name, text in pages.items():
        target = outdir / name
        tmp = outdir / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, target)
        except OSError as e:
            raise ManpageError(f"cannot write {target}: {e.strerror or e}") from None
        written.append(target)
    return written
