"""Where the package's data and notebooks are: the one place that knows.

In the source tree they live at the repository root, ``data/{toy,prompts,heldout,harness-tasks}`` and
``notebooks/``. A built wheel (``pip install .``) carries them inside the package, as
``chatvec_lab/data`` and ``chatvec_lab/notebooks`` (``[tool.setuptools.package-dir]`` in
pyproject.toml maps the two folders into the package). So the lookup is: the copy inside the
installed package if there is one, else the source checkout's (an editable install, or running
from the repository). ``$CHATVEC_TOY_DIR`` still overrides the toy family's folder (``toy.data_dir``).

    chatvec notebooks DIR      # copy the notebooks out of the installed package, then `jupyter lab DIR`
"""
from __future__ import annotations

import shutil
from pathlib import Path

from chatvec_lab.errors import NotFound

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # chatvec_lab/, this module lives in chatvec_lab/io/


def _checkout_root() -> Path | None:
    """The repository root when the package is imported from a source checkout, else None."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "chatvec_lab").is_dir() else None


def _find(name: str) -> Path:
    bundled = PACKAGE_DIR / name
    if bundled.is_dir():
        return bundled
    root = _checkout_root()
    if root is not None and (root / name).is_dir():
        return root / name
    return bundled  # missing: callers say what is missing where


def data_dir() -> Path:
    """The folder holding ``toy/``, ``prompts/`` and ``heldout/``."""
    return _find("data")


def harness_task_dir() -> Path:
    """The folder of the lm-evaluation-harness tasks shipped with the lab (``chatvec eval``): a folder per task,
    its YAML beside its local data file."""
    return data_dir() / "harness-tasks"


def notebook_dir() -> Path:
    """The folder holding the teaching notebooks (``*.ipynb``)."""
    return _find("notebooks")


def inputs() -> list[Path]:
    """What the demo and the evaluation read: an output of theirs may not be, contain or sit inside any of it."""
    data = data_dir()
    return [data / "toy", data / "toy-bilingual", data / "prompts", data / "heldout", notebook_dir()]


def notebooks() -> list[Path]:
    """The shipped notebooks, sorted; raises if the package has none (a broken install)."""
    found = sorted(notebook_dir().glob("*.ipynb"))
    if not found:
        raise NotFound(f"no notebooks found at {notebook_dir()}; reinstall chatvec_lab")
    return found


def _check_not_in_package(dest: Path) -> None:
    """Refuse a destination that is, or lies inside, the installed package or one of its inputs (data, notebooks):
    links resolved, so ``--overwrite`` can never write into the package's own folders."""
    from chatvec_lab.errors import OutputError

    try:
        real = dest.absolute().resolve()
    except (OSError, RuntimeError) as e:
        raise OutputError(f"cannot write to {dest}: {e}") from None
    for protected in [PACKAGE_DIR, *inputs()]:
        p = protected.resolve()
        if real == p or p in real.parents:
            raise OutputError(f"output {dest} {'is' if real == p else 'is inside'} {p}, part of the installed "
                              "chatvec_lab (its package or data): choose a folder of your own")


def copy_notebooks(dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy the notebooks into ``dest``; returns the copies.

    ``dest`` must not exist or be empty: then the folder appears at once, complete, or not at all.
    A non-empty ``dest`` is refused unless ``overwrite``; then only the notebooks are replaced
    (each atomically) and every other file in ``dest`` (your own notebooks, caches) is left alone.
    """
    from chatvec_lab.errors import OutputError
    from chatvec_lab.io.output import atomic_file, atomic_folder

    sources = notebooks()
    inputs = [notebook_dir()]  # never onto the package's own copies
    dest = Path(dest).expanduser()
    _check_not_in_package(dest)
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output {dest} exists and is not a folder")
    if not dest.exists() or not any(dest.iterdir()):
        if dest.exists():
            try:  # an empty folder gives way, atomically; one that filled up meanwhile stays and refuses
                dest.rmdir()
            except OSError:
                raise OutputError(f"output {dest} is no longer empty (pass --overwrite to replace the notebooks "
                                  "in it; other files are kept)") from None
        with atomic_folder(dest, overwrite=False, inputs=inputs) as tmp:
            for src in sources:
                shutil.copyfile(src, tmp / src.name)
        return [dest / src.name for src in sources]
    if not overwrite:
        raise OutputError(f"output {dest} exists and is not empty (pass --overwrite to replace the "
                          "notebooks in it; other files are kept)")
    for src in sources:
        with atomic_file(dest / src.name, overwrite=True, inputs=inputs) as tmp:
            shutil.copyfile(src, tmp)
    return [dest / src.name for src in sources]
