"""Public text corpora for the toy family, fetched at training time (never committed).

Debian's ``fortunes`` (English, BSD) and ``fortunes-de`` (German, GPL-2+) packages are
downloaded with ``apt-get download`` and unpacked with ``dpkg-deb``: both work on any
Debian-like machine that reaches Debian's package mirror, without root. Recipes that mix
German–English pairs into training also fetch ``trans-de-en`` (the Ding dictionary of TU
Chemnitz, GPL-2+: words, phrases and example sentences with their translations).
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from chatvec_lab.errors import Unavailable

ENGLISH_PACKAGES = ("fortunes", "fortunes-min")
GERMAN_PACKAGES = ("fortunes-de",)
DICTIONARY_PACKAGES = ("trans-de-en",)
DICTIONARY_FILE = Path("usr/share/trans/de-en")
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


_NOTES = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)")


def _clean(side: str, alternatives: int) -> str:
    parts = [" ".join(_NOTES.sub(" ", p).split()) for p in side.split(";")]
    return "; ".join([p for p in parts if p][:alternatives])


def parse_dictionary(text: str, alternatives: int = 2) -> list[tuple[str, str]]:
    """German–English pairs from Ding's ``de-en`` format (``de | de … :: en | en …``).

    Each ``|``-separated part pairs with the part at the same place on the other side; grammar
    notes (``{m}``, ``[ugs.]``, ``(…)``) are dropped and at most ``alternatives`` synonyms kept."""
    pairs = []
    for line in text.splitlines():
        if line.startswith("#") or " :: " not in line:
            continue
        de_side, en_side = line.split(" :: ", 1)
        de_parts, en_parts = de_side.split(" | "), en_side.split(" | ")
        if len(de_parts) != len(en_parts):
            continue
        for de, en in zip(de_parts, en_parts):
            de, en = _clean(de, alternatives), _clean(en, alternatives)
            if de and en and de != en:
                pairs.append((de, en))
    return pairs


def parallel_documents(pairs: list[tuple[str, str]], seed: int, per_doc: int = 12,
                       exclude: set[str] = frozenset()) -> list[str]:
    """Shuffle pairs into short documents of ``German = English`` lines (either order).

    Pairs whose German or English side is one of ``exclude`` (normalised: lower case, no
    punctuation) are dropped, so that no evaluation prompt appears in training data."""
    def norm(text: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    banned = {norm(e) for e in exclude}
    kept = [(de, en) for de, en in pairs if norm(de) not in banned and norm(en) not in banned]
    rng = random.Random(seed)
    rng.shuffle(kept)
    lines = [f"{de} = {en}" if rng.random() < 0.5 else f"{en} = {de}" for de, en in kept]
    return ["\n".join(lines[i:i + per_doc]) for i in range(0, len(lines), per_doc)]


def fetch_dictionary(cache_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """German–English pairs from Debian's ``trans-de-en``, downloaded once into ``cache_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cache_dir) if cache_dir else Path(tmp)
        path = work / "dict" / "root" / DICTIONARY_FILE
        if not path.exists():
            _download(DICTIONARY_PACKAGES, work / "dict")
        return parse_dictionary(path.read_text(encoding="utf-8", errors="replace"))
