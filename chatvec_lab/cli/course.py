"""The ``chatvec`` commands for learners: ``demo`` (the lab on the toy families → a report folder) and
``notebooks`` (copy the teaching notebooks out, to open in JupyterLab).

Each command is a pair: ``*_arguments`` adds its flags to its parser, ``run_*`` calls the library with them.
``COMMANDS`` lists them for ``chatvec_lab.cli``.
"""
from __future__ import annotations

from chatvec_lab.cli.arguments import Command, add_device_options, add_quiet

# ---------------------------------------------------------------------------------------------- demo


def demo_arguments(d) -> None:
    d.add_argument("-o", "--out", default="chatvec-report")
    d.add_argument("--no-notebooks", action="store_true", help="skip executing the notebooks")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke test: 8 prompts per set, α 0 and 1, one notebook")
    size.add_argument("--full", action="store_true", help="the complete report: tuning and held-out prompts, 3 "
                      "seeds, 2 samplings, conversations, the whole atlas, every notebook")
    d.add_argument("--overwrite", action="store_true")
    add_device_options(d, batch=False)
    add_quiet(d)


def run_demo(args) -> None:
    from chatvec_lab.course.demo import run_demo as demo

    out = demo(args.out, overwrite=args.overwrite, notebooks=not args.no_notebooks, quick=args.quick,
               full=args.full, device=args.device, dtype=args.dtype)
    print(f"report: {out}")


# ---------------------------------------------------------------------------------------------- notebooks


def notebooks_arguments(n) -> None:
    n.add_argument("dir", help="where to put them (a new or empty folder)")
    n.add_argument("--overwrite", action="store_true", help="replace the notebooks in a non-empty folder (other files stay)")


def run_notebooks(args) -> None:
    import importlib.util
    import shlex

    from chatvec_lab.io.resources import copy_notebooks

    copied = copy_notebooks(args.dir, overwrite=args.overwrite)
    folder = copied[0].parent.resolve()
    print(f"copied {len(copied)} notebooks to {folder}:")
    print("".join(f"  {p.name}\n" for p in copied), end="")
    print(f"open them with:  jupyter lab {shlex.quote(str(folder))}")
    if importlib.util.find_spec("jupyterlab") is None:
        print("(JupyterLab is not installed here: pip install 'chatvec_lab[notebooks]')")


COMMANDS = {
    "demo": Command("run the lab on the toy families and write a report folder (default: every held-out prompt once, "
                    "both families, the atlas's knock-out map, notebooks 00-02)", demo_arguments, run_demo),
    "notebooks": Command("copy the teaching notebooks into a folder, to open in JupyterLab", notebooks_arguments,
                         run_notebooks),
}
