"""The README is a front page, and the docs site behind it builds offline, strictly, from the code as it is.

The site is built once for this module (``python -m mkdocs build --strict`` into a temporary folder, with every
proxy pointed at a closed port so that a build step that reaches for the network fails), then read: the
command-line page holds every subcommand and flag of ``chatvec_lab.cli.build_parser()``, every public module has
its API page, and no page loads a script, style sheet, font or image from another host.
"""
from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "chatvec_lab"
README = ROOT / "README.md"
README_LIMIT = 16 * 1024
# the README's two commands, byte for byte: CI runs the second one as the README states it
MAIN_JOB = 'python -m pip install torch==2.13.0 -e ".[notebooks]" && chatvec demo -o chatvec-report'
TESTS = 'python -m pip install -q torch==2.13.0 -e ".[test]" && python -m pytest -q'
BUILD_TIMEOUT_S = 300


def public_modules() -> list[str]:
    """Every public module of the package by walking its folders (any part starting with ``_`` is private)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = ["chatvec_lab", *path.relative_to(PACKAGE).with_suffix("").parts]
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            names.add(".".join(parts))
    return sorted(names)


def offline_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection fails at once
    env.update(http_proxy=closed, https_proxy=closed, HTTP_PROXY=closed, HTTPS_PROXY=closed, all_proxy=closed,
               ALL_PROXY=closed, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", NO_MKDOCS_2_WARNING="1")
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
        import mkdocs_jupyter  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the docs tools are missing ({exc}); they come with the test extra: "
                    'python -m pip install -e ".[test]" (or ".[docs]")', pytrace=False)
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "site"
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-d", str(out),
                          "-f", str(ROOT / "mkdocs.yml")],
                         cwd=tmp, env=offline_env(tmp),  # in tmp: mkdocs-jupyter's cache (.cache/, under the cwd)
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    took = time.monotonic() - start
    assert run.returncode == 0, (f"mkdocs build --strict failed ({took:.0f} s):\n"
                                 f"{run.stdout[-4000:]}\n{run.stderr[-8000:]}")
    assert (out / "index.html").is_file()
    return out


# ------------------------------------------------------------------------------------------------- README


def test_readme_is_a_front_page_holding_the_two_commands():
    data = README.read_bytes()
    assert len(data) <= README_LIMIT, f"README.md is {len(data):,} bytes; the front page stays within {README_LIMIT:,}"
    text = data.decode("utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert any(MAIN_JOB in b.splitlines() for b in blocks), "the main job's command, verbatim, in a ```bash block"
    # CI runs this line as it stands in the README: alone in its own block
    assert [TESTS] in [b.splitlines() for b in blocks], "the test command, verbatim, alone in a ```bash block"


def _readme_links(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    reference = re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$", text, flags=re.MULTILINE)
    return inline + reference


def test_every_relative_link_in_the_readme_resolves():
    links = _readme_links(README.read_text(encoding="utf-8"))
    assert links, "the README links to its docs pages"
    missing = []
    for link in links:
        parts = urlsplit(link)
        if parts.scheme or parts.netloc or not parts.path:  # a URL, or an anchor in the README itself
            continue
        if not (ROOT / unquote(parts.path)).exists():
            missing.append(link)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_links_to_the_docs_pages():
    links = {urlsplit(link).path for link in _readme_links(README.read_text(encoding="utf-8"))}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert {"docs/install.md", "docs/cli.md", "docs/api/index.md"} <= links
    assert not pages - links, f"docs pages the README does not link: {sorted(pages - links)}"


# ------------------------------------------------------------------------------------------------- the site


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "chatvec"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


def test_cli_page_lists_every_subcommand_and_flag(site):
    from chatvec_lab.cli import build_parser

    page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    subcommands = list(_subcommands(build_parser()))
    assert len(subcommands) >= 2
    for full, sub in subcommands:
        anchor = "-".join(full.split())
        assert f'id="{anchor}"' in page, f"the command-line page lacks a section for `{full}`"
        section = page.split(f'id="{anchor}"', 1)[1]
        section = section.split('<h3 id="', 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for name in names:
                assert name in section, f"`{full}`: {name} is not in its section of the command-line page"
            if action.help:
                first_words = " ".join(action.help.split()[:3])
                if "%(" not in first_words:
                    assert html.escape(first_words, quote=False) in section, f"`{full}` {names[0]}: its help text"


def test_every_public_module_has_an_api_page(site):
    modules = public_modules()
    assert "chatvec_lab" in modules and len(modules) > 10
    missing = [m for m in modules if not (site / "api" / m / "index.html").is_file()]
    assert not missing, f"public modules without an API page: {missing}"
    for module in modules:
        page = (site / "api" / module / "index.html").read_text(encoding="utf-8")
        assert module in page
    index = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert all(f"{m}/" in index for m in modules), "the API index links every module page"


def test_the_course_notebooks_are_pages(site):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / notebook.stem / "index.html"
        assert page.is_file(), f"{notebook.name} has no page in the course"
        assert "jp-Notebook" in page.read_text(encoding="utf-8")


class _Resources(HTMLParser):
    """Every URL a page fetches by itself: script, style sheet, icon, font, image, frame, media, CSS url()."""

    FETCHED: ClassVar[dict[str, list[str]]] = {
        "script": ["src"], "link": ["href"], "img": ["src", "srcset"], "iframe": ["src"], "source": ["src", "srcset"],
        "video": ["src", "poster"], "audio": ["src"], "embed": ["src"], "object": ["data"], "track": ["src"],
        "input": ["src"], "image": ["href", "xlink:href"], "use": ["href", "xlink:href"]}
    NOT_FETCHED_LINKS: ClassVar[set[str]] = {"canonical", "alternate", "author", "license", "next", "prev", "help",
                                             "search", "bookmark"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str]] = []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and set((attrs.get("rel") or "").split()) <= self.NOT_FETCHED_LINKS and attrs.get("rel"):
            pass
        else:
            for name in self.FETCHED.get(tag, []):
                for url in re.split(r",\s*", attrs.get(name) or ""):
                    if url.strip():
                        self.urls.append((f"<{tag} {name}>", url.strip().split()[0]))
        if attrs.get("style"):
            self.urls += [("style attribute", u) for u in _css_urls(attrs["style"])]
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.urls += [("<style>", u) for u in _css_urls(data)]
        elif self._in == "script":
            # code that loads from elsewhere: import("…"), import … from "…", fetch/src = "https://…"
            self.urls += [("<script> import", u) for u in re.findall(r"""import\s*\(?\s*["'`]([^"'`]+)["'`]""", data)]
            self.urls += [("<script> import", u) for u in re.findall(r"""\bfrom\s+["']([^"']+)["']""", data)]
            self.urls += [("<script> load", u) for u in
                          re.findall(r"""(?:\.src\s*=|fetch\(|loadScript\(|require\(\[)\s*["'`]([^"'`]+)""", data)]


def _css_urls(css: str) -> list[str]:
    urls = re.findall(r"""url\(\s*["']?([^"')]+)""", css)
    urls += re.findall(r"""@import\s+["']([^"']+)""", css)
    return urls


def _external(url: str) -> bool:
    url = url.strip()
    return url.startswith("//") or bool(re.match(r"(?i)https?:", url))


def test_no_page_loads_anything_from_the_network(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    found = []
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        found += [f"{page.relative_to(site)}: {where} {url}" for where, url in parser.urls if _external(url)]
    for sheet in sorted(site.rglob("*.css")):
        found += [f"{sheet.relative_to(site)}: url()/@import {u}" for u in _css_urls(sheet.read_text(encoding="utf-8"))
                  if _external(u)]
    assert not found, "pages that load from the network (no CDN, no web fonts):\n" + "\n".join(found[:40])


def test_the_detector_sees_external_resources():
    """The check above is only worth something if it catches what it looks for."""
    page = ('<link rel="stylesheet" href="https://fonts.googleapis.com/css"><script src="//cdn.example/x.js"></script>'
            '<style>@import "https://x.example/a.css"; p{background:url(http://x.example/b.png)}</style>'
            '<script type="module">const m = (await import("https://cdnjs.example/mermaid.mjs")).default;</script>'
            '<link rel="canonical" href="https://example.org/page/"><a href="https://example.org/">a plain link</a>')
    parser = _Resources()
    parser.feed(page)
    external = sorted(u for _, u in parser.urls if _external(u))
    assert external == sorted(["https://fonts.googleapis.com/css", "//cdn.example/x.js", "https://x.example/a.css",
                               "http://x.example/b.png", "https://cdnjs.example/mermaid.mjs"])


def test_the_site_holds_the_moved_readme_text(site):
    """The front page's sections moved into pages: each page exists, and the home page is the README."""
    for page in ["install", "demo", "python", "cli", "course", "toy-family", "atlas", "measures", "real-models",
                 "ray", "benchmarks", "trust", "honest-labels", "design", "contributing"]:
        assert (site / page / "index.html").is_file(), page
    home = html.unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text(encoding="utf-8")))
    assert "chat vector" in home and MAIN_JOB in home and TESTS in home
