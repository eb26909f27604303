"""Public text corpora for the toy family, fetched at training time (never committed).

Debian's ``fortunes`` (English, BSD) and ``fortunes-de`` (German, GPL-2+) packages are
downloaded with ``apt-get download`` and unpacked with ``dpkg-deb``: both work on any
Debian-like machine that reaches Debian's package mirror, without root.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from chatvec_lab.errors import Unavailable

ENGLISH_PACKAGES = ("fortunes", "fortunes-min")
GERMAN_PACKAGES = ("fortunes-de",)
FORTUNE_DIR = Path("usr/share/games/fortunes")


class CorpusUnavailable(Unavailable):
    """The Debian fortune packages could not be fetched (no apt-get, or no mirror)."""


def split_fortunes(text: str) -> list[str]:
    """Split a fortune file on lines holding only ``%`` and tidy each entry."""
    entries = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [line.rstrip() for line in chunk.strip("\n").splitlines()]
        entry = "\n".join(line.strip() for line in lines).strip()
        if entry:
            entries.append(entry)
    return entries


def _download(packages: tuple[str, ...], workdir: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable("apt-get/dpkg-deb not found: the toy corpora come from Debian packages")
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", *packages], cwd=debs, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusUnavailable(f"apt-get download {' '.join(packages)} failed: {proc.stderr.strip()[-300:]}")
    root = workdir / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / FORTUNE_DIR


def _read_dir(folder: Path) -> list[str]:
    entries: list[str] = []
    for f in sorted(folder.iterdir()):
        if f.is_dir() or f.is_symlink() or f.suffix in {".dat", ".u8"}:
            continue
        entries.extend(split_fortunes(f.read_text(encoding="utf-8", errors="replace")))
    return entries


def fetch_fortunes(cache_dir: str | Path | None = None) -> dict[str, list[str]]:
    """Return ``{"en": [...], "de": [...]}`` fortune entries, downloading the packages once."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cache_dir) if cache_dir else Path(tmp)
        en_dir = work / "en" / "root" / FORTUNE_DIR
        de_dir = work / "de" / "root" / FORTUNE_DIR / "de"
        if not en_dir.exists():
            _download(ENGLISH_PACKAGES, work / "en")
        if not de_dir.exists():
            _download(GERMAN_PACKAGES, work / "de")
        return {"en": _read_dir(en_dir), "de": _read_dir(de_dir)}
