"""MkDocs hook: the parts of the site that are generated at build time, from the code as it is.

- **API reference**: one page per public module of ``chatvec_lab`` (``api/<dotted.name>.md``, rendered by
  mkdocstrings from the docstrings), found by walking the package's folders: no module path is written down
  anywhere, so a module that moves gets its page at its new name on the next build. A module whose dotted name
  has a part starting with ``_`` is private and gets no page.
- **CLI reference**: the page holding ``<!-- chatvec:cli-reference -->`` gets every subcommand and flag of
  ``chatvec_lab.cli.build_parser()`` with its help, default and choices.
- **Module index**: ``<!-- chatvec:module-index -->`` becomes a table of every public module and the first line
  of its docstring.
- **Module references in prose**: ``[[mod:NAME]]`` (``NAME`` the last part(s) of a dotted module name, e.g.
  ``[[mod:vector]]``, ``[[mod:toy.train]]``) becomes a link to that module's API page under its current name;
  an unknown or ambiguous name stops the build (written right after a backtick, as in ```[[mod:x]]``, it is left
  as it is). ``[[path:NAME]]`` becomes the bare dotted name (for code blocks).
- **Front page and contributing guide**: ``README.md`` becomes the home page and ``CONTRIBUTING.md`` the page
  ``contributing/``, their links rewritten for the site (``docs/x.md`` → ``x.md``; other relative links are
  treated as links into the repository, below).
- **The course**: ``notebooks/*.ipynb`` become pages ``notebooks/<name>/`` (rendered by mkdocs-jupyter, not
  executed; git holds them without outputs).
- **Links into the repository**: a page may link out of ``docs/`` to the repository, as GitHub shows it: an image
  (``![…](../data/eval-toy/toy_effect.png)``) is copied into the site under ``repo/`` and the link pointed there;
  a notebook (``[…](../notebooks/01_quickstart.ipynb)``) is pointed at its page in the course; ``README.md`` and
  ``CONTRIBUTING.md`` at their pages. Any other link that leaves ``docs/`` is left as it is, so that strict mode
  stops the build on it.
- **No network**: nbconvert's notebook template loads MathJax and Mermaid from a CDN; both are removed from the
  notebook pages here (the notebooks hold no math and no diagrams; math would show as TeX source).
  ``tests/test_docs.py`` fails on any page that still loads a script, style sheet or font from another host.
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

PACKAGE = "chatvec_lab"
ROOT = Path(__file__).resolve().parents[2]
if (ROOT / PACKAGE / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # document this checkout's package, whatever the folder mkdocs runs in
CLI_MARKER = "<!-- chatvec:cli-reference -->"
MODULE_INDEX_MARKER = "<!-- chatvec:module-index -->"
MODULE_REF = re.compile(r"(?<!`)\[\[mod:([A-Za-z0-9_.]+)\]\]")
MODULE_PATH = re.compile(r"(?<!`)\[\[path:([A-Za-z0-9_.]+)\]\]")
ROOT_PAGES = {"README.md": "index.md", "CONTRIBUTING.md": "contributing.md"}  # repository file → site page
IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp"}
# [text](target), ![alt](target) or … (target "title"): the target is group 2
LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")


# ---------------------------------------------------------------------------------------------- the package


def package_dir() -> Path:
    """The package's folder: the checkout's when building from one, else wherever Python finds it."""
    here = ROOT / PACKAGE
    if (here / "__init__.py").is_file():
        return here
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(f"cannot find the {PACKAGE} package to document")
    return Path(next(iter(spec.submodule_search_locations)))


def public_modules() -> list[str]:
    """Every public module's dotted name, packages included, sorted; found by walking the folders."""
    base = package_dir()
    names = set()
    for path in base.rglob("*.py"):
        rel = path.relative_to(base).with_suffix("")
        parts = [PACKAGE, *rel.parts]
        if "__pycache__" in parts or not all(p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        names.add(".".join(parts))
    return sorted(names, key=lambda n: n.split("."))


def first_docstring_line(module: str) -> str:
    import ast

    base = package_dir()
    rel = Path(*module.split(".")[1:])
    candidates = [base / rel / "__init__.py", base / rel.with_suffix(".py")] if rel.parts else [base / "__init__.py"]
    for path in candidates:
        if path.is_file():
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            return " ".join(doc.strip().split("\n\n")[0].split())
    return ""


def api_uri(module: str) -> str:
    return f"api/{module}.md"


def resolve_module(name: str, modules: list[str]) -> str:
    exact = [m for m in modules if m == name or m == f"{PACKAGE}.{name}"]
    found = exact or [m for m in modules if m.endswith("." + name)]
    if len(found) != 1:
        raise PluginError(f"[[mod:{name}]] names {'no module' if not found else 'several modules: ' + ', '.join(found)}"
                          f" of {PACKAGE}")
    return found[0]


# ---------------------------------------------------------------------------------------------- the CLI


def _md(text: str) -> str:
    """Plain text (a help string) as Markdown text: HTML and Markdown's own characters escaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", text)


def _flag(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            return names
        choices = None if action.choices is None else "{" + ",".join(map(str, action.choices)) + "}"
        metavar = action.metavar or choices or action.dest.upper()
        if isinstance(metavar, tuple):
            metavar = " ".join(metavar)
        if action.nargs == "?":
            metavar = f"[{metavar}]"
        elif action.nargs in ("*", "+"):
            metavar = f"{metavar} …"
        return f"{names} {metavar}"
    return action.metavar or action.dest


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name), sub


def cli_reference() -> str:
    try:
        from chatvec_lab.cli import build_parser

        parser = build_parser()
    except Exception as exc:  # the page cannot be written without the parser: say why, in one line
        raise PluginError(f"the command-line reference needs {PACKAGE}.cli.build_parser(): "
                          f"{type(exc).__name__}: {exc}") from exc
    out = []

    def describe(prefix: str, parser: argparse.ArgumentParser, level: int):
        formatter = parser._get_formatter()
        for name, help_text, sub in _subcommands(parser):
            full = f"{prefix} {name}"
            anchor = "-".join(full.split())
            out.append(f"{'#' * level} `{full}` {{#{anchor}}}\n")
            if help_text:
                out.append(_md(help_text) + "\n")
            if sub.description and sub.description != help_text:
                out.append(_md(sub.description) + "\n")
            usage = sub.format_usage().strip()
            usage = usage.removeprefix("usage: ")
            out.append(f"```text\n{usage}\n```\n")
            rows = []
            for action in sub._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                text = formatter._expand_help(action) if action.help else ""
                if action.help == argparse.SUPPRESS:
                    continue
                extra = []
                if action.required and action.option_strings:
                    extra.append("required")
                if action.choices is not None and not isinstance(action.choices, dict):
                    extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
                if (action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
                        and "%(default)" not in (action.help or "")):
                    default = action.default
                    if isinstance(default, (list, tuple)):
                        default = ",".join(str(d) for d in default)
                    extra.append(f"default `{default}`")
                if isinstance(action, argparse._AppendAction) and "repeatable" not in text:
                    extra.append("repeatable")
                cell = _md(text)
                if extra:
                    cell = (cell + " " if cell else "") + "(" + "; ".join(extra) + ")"
                rows.append(f"| `{_flag(action)}` | {cell or '–'} |")
            if rows:
                out.append("| argument | what it does |\n|---|---|\n" + "\n".join(rows) + "\n")
            describe(full, sub, level + 1)

    describe(parser.prog, parser, 3)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- MkDocs events


def _modules_nav(modules: list[str]) -> list:
    """The API section of the nav: the package root, then one group per subpackage (or lone module)."""
    nav: list = []
    groups: dict[str, list] = {}
    for m in modules:
        parts = m.split(".")
        if len(parts) == 1:
            nav.append({m: api_uri(m)})
            continue
        groups.setdefault(parts[1], []).append(m)
    for head, members in groups.items():
        if len(members) == 1:
            nav.append({members[0]: api_uri(members[0])})
        else:
            nav.append({f"{PACKAGE}.{head}": [{m: api_uri(m)} for m in members]})
    return nav


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def _notebook_title(path: Path) -> str:
    import json

    for cell in json.loads(path.read_text(encoding="utf-8")).get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def _fill(nav: list, anchor: str, entries: list) -> bool:
    """Append ``entries`` to the nav list that holds the page ``anchor``."""
    for item in nav:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, list):
                if anchor in value or any(isinstance(v, dict) and anchor in v.values() for v in value):
                    value.extend(entries)
                    return True
                if _fill(value, anchor, entries):
                    return True
    return False


def _named(nav) -> set:
    """Every page the nav names, at any depth."""
    found = set()
    for item in nav if isinstance(nav, list) else [nav]:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            found |= _named(value) if isinstance(value, (list, dict)) else {value}
    return found


_state: dict = {}


def on_config(config, **kwargs):
    modules = public_modules()
    if not modules:
        raise PluginError(f"found no module of {PACKAGE} to document")
    _state["modules"] = modules
    nav = config.get("nav")
    if nav:
        if not _fill(nav, "api/index.md", _modules_nav(modules)):
            raise PluginError("the nav needs an entry api/index.md: the API pages go beside it")
        named = _named(nav)  # notebooks the nav places itself (e.g. under "Session two") are not added again
        course = [{_notebook_title(p): f"notebooks/{p.name}"} for p in _notebooks()
                  if f"notebooks/{p.name}" not in named]
        if not _fill(nav, "course.md", course):
            raise PluginError("the nav needs an entry course.md: the notebooks go beside it")
    return config


@event_priority(50)  # before mkdocs-jupyter's on_files, so that it renders the notebooks added here
def on_files(files, config, **kwargs):
    for module in _state["modules"]:
        files.append(File.generated(config, api_uri(module), content=(
            f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
            f"      show_root_toc_entry: false\n")))
    for path in _notebooks():
        # a File whose src_dir is the repository (not File.generated: mkdocs-jupyter's wrapper reads the source
        # path through src_dir)
        files.append(File(f"notebooks/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    for name, uri in ROOT_PAGES.items():
        if (ROOT / name).is_file():
            files.append(File.generated(config, uri, content=_root_page(ROOT / name)))
    # images of the repository that pages link to with a path leaving docs/
    docs_dir = Path(config["docs_dir"]).resolve()
    mirrored = set()
    for page in [f for f in files if f.src_uri.endswith(".md") and not f.src_uri.startswith("api/")]:
        text = page.content_string
        for _, target, _ in LINK.findall(text):
            repo_path = _repo_target(target, page.src_uri, docs_dir)
            if repo_path and Path(repo_path).suffix.lower() in IMAGE_SUFFIXES and repo_path not in mirrored:
                mirrored.add(repo_path)
                files.append(File.generated(config, "repo/" + repo_path, abs_src_path=str(ROOT / repo_path)))
    return files


def _root_page(path: Path) -> str:
    """A Markdown file of the repository's root as a page at the site's root: ``docs/x`` links lose ``docs/``, other
    relative links get ``../`` (links into the repository, resolved by ``repo_link``)."""
    def rewrite(match):
        target = match.group(2)
        if ":" in target.split("/")[0] or target.startswith(("#", "/")):
            return match.group(0)
        target = target[len("docs/"):] if target.startswith("docs/") else "../" + target
        return match.group(1) + target + match.group(3)

    return LINK.sub(rewrite, path.read_text(encoding="utf-8"))


def _repo_target(target: str, page_uri: str, docs_dir: Path) -> str | None:
    """The repository path (``data/x.png``) of a link that leaves docs/ for a file of the repository, or None."""
    if ":" in target.split("/")[0] or target.startswith(("#", "/")):
        return None  # a URL (https:, mailto:, data:), an anchor, an absolute path
    path = (docs_dir / posixpath.dirname(page_uri) / target.split("#")[0]).resolve()
    if path.is_relative_to(docs_dir) or not path.is_relative_to(ROOT) or not path.is_file():
        return None
    return path.relative_to(ROOT).as_posix()


def on_page_markdown(markdown, page, config, files, **kwargs):
    modules = _state["modules"]
    page_dir = posixpath.dirname(page.file.src_uri)

    def module_link(match):
        module = resolve_module(match.group(1), modules)
        return f"[`{module}`]({posixpath.relpath(api_uri(module), page_dir or '.')})"

    def repo_link(match):
        repo_path = _repo_target(match.group(2), page.file.src_uri, Path(config["docs_dir"]).resolve())
        if repo_path is None:
            return match.group(0)
        if Path(repo_path).suffix.lower() in IMAGE_SUFFIXES:
            uri = "repo/" + repo_path
        elif repo_path.startswith("notebooks/") and repo_path.endswith(".ipynb"):
            uri = repo_path
        elif repo_path in ROOT_PAGES:
            uri = ROOT_PAGES[repo_path]
        else:
            return match.group(0)
        fragment = "#" + match.group(2).split("#", 1)[1] if "#" in match.group(2) else ""
        return match.group(1) + posixpath.relpath(uri, page_dir or ".") + fragment + match.group(3)

    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if MODULE_INDEX_MARKER in markdown:
        rows = [f"| [`{m}`]({posixpath.relpath(api_uri(m), page_dir or '.')}) | "
                f"{_md(first_docstring_line(m)) or '–'} |" for m in modules]
        markdown = markdown.replace(MODULE_INDEX_MARKER, "| module | what it does |\n|---|---|\n" + "\n".join(rows))
    markdown = MODULE_REF.sub(module_link, markdown)
    markdown = MODULE_PATH.sub(lambda m: resolve_module(m.group(1), modules), markdown)
    return LINK.sub(repo_link, markdown)


# nbconvert's loaders of MathJax and Mermaid, both from a CDN (see the module's docstring)
_CDN_LOADERS = [
    re.compile(r"<!-- Load mathjax -->\s*<script src=\"https?://[^\"]*\">\s*</script>"),
    re.compile(r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*?</script>", re.DOTALL),
]


def on_post_page(output, page, config, **kwargs):
    if page.file.src_uri.endswith(".ipynb"):
        if "jp-Mermaid" in output.replace(".jp-Mermaid", ""):
            raise PluginError(f"{page.file.src_uri}: a Mermaid diagram needs mermaid.js, which is not shipped")
        for loader in _CDN_LOADERS:
            output = loader.sub("", output)
    return output
