"""The ``chatvec`` command line's shared pieces: argument types, the options several commands share, and the
shape of a command.

An argument type turns the text of a flag into a value, or raises ``argparse.ArgumentTypeError`` with a message
that says what was expected (argparse prints it as ``chatvec CMD: error: argument --flag: MESSAGE``).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, NamedTuple

from chatvec_lab.errors import ChatVecError


class Command(NamedTuple):
    """One subcommand: its line in ``chatvec --help``, what adds its flags to its parser, and what runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


# ---------------------------------------------------------------------------------------------- argument types


def alpha_list(text: str) -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``: finite numbers separated by commas."""
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas must be numbers separated by commas, not {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"alphas must be finite numbers, not {text!r}")
    return values


def one_number(text: str) -> float:
    """One finite number."""
    values = alpha_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one number expected, not {text!r}")
    return values[0]


def layer_list(text: str) -> list[int]:
    """``"0-3,6"`` → ``[0, 1, 2, 3, 6]``: layers and ranges of layers."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if a > b:
                    raise argparse.ArgumentTypeError(f"layer range {part!r} runs backwards: write {b}-{a}")
                if b - a >= 100_000:
                    raise argparse.ArgumentTypeError(f"layer range {part!r} is far larger than any model")
                out.extend(range(a, b + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers look like 0-15 or 0,2,4, not {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no layer in {text!r}")
    return out


def positive_int(text: str, what: str = "expected a positive integer") -> int:
    """A whole number ≥ 1; ``what`` is the message otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def max_new_tokens(text: str) -> int:
    """A reply's length limit in tokens: a positive integer."""
    return positive_int(text, "--max-new-tokens must be a positive integer")


def matrix_rank(text: str) -> int:
    """A rank to keep of every matrix: a positive integer up to ``core.transforms.MAX_RANK``."""
    from chatvec_lab.core.transforms import MAX_RANK

    value = positive_int(text, "rank must be a positive integer")
    if value > MAX_RANK:
        raise argparse.ArgumentTypeError(f"rank {text} is far larger than any matrix (at most {MAX_RANK}; a rank "
                                         "above a matrix's own keeps it whole)")
    return value


def rank_list(text: str) -> list[int]:
    """``"1,4,16"`` → ``[1, 4, 16]``: ranks separated by commas."""
    return [matrix_rank(part) for part in text.split(",") if part.strip()] or [matrix_rank(text)]


def seed_count(text: str) -> int:
    """A number of sampling seeds (seeds 0 … N-1), up to ``behaviour.grid.MAX_SEEDS``."""
    from chatvec_lab.behaviour.grid import MAX_SEEDS

    value = positive_int(text, "--seeds is a number of sampling seeds (seeds 0, 1, … N-1): a positive integer")
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"--seeds {text} is more than {MAX_SEEDS:,} seeds")
    return value


def shard_gb(text: str) -> float:
    """The largest shard of a written model, in GB."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value * 1024**3 < 1 or value > 1024**2:
        raise argparse.ArgumentTypeError(f"--max-shard-gb is the largest shard in GB: a finite number above 0 and "
                                         f"at most 1048576 (e.g. 4, or 1000 for one file), not {text!r}")
    return value


NUMBER_OPTIONS = ("--alpha", "--alphas")


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``--alpha -1e-3`` as ``--alpha=-1e-3``: argparse takes a value in exponent notation that starts with a
    minus for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in NUMBER_OPTIONS and arg.startswith("-"):
            try:
                alpha_list(arg)
            except argparse.ArgumentTypeError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------- shared options


def add_write_options(p: argparse.ArgumentParser) -> None:
    """``--overwrite``, ``--allow-pickle``, ``--max-shard-gb``: the commands that write weights (extract, apply)."""
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt weights (weights_only=True)")
    p.add_argument("--max-shard-gb", type=shard_gb, default=4.0)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``, ``--actors``, ``--threads-per-actor``, ``--gpus-per-actor``: the commands that run a grid
    (sweep, atlas)."""
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the grid's cells on Ray actors: 'local' (the default) starts Ray here, or a "
                        "cluster's address ('auto', 'ray://host:10001'); pip install 'chatvec_lab[distributed]'")
    p.add_argument("--actors", type=positive_int, default=2, help="with --ray: actors, one model each")
    p.add_argument("--threads-per-actor", type=positive_int, default=1, help="with --ray: torch threads per actor")
    p.add_argument("--gpus-per-actor", type=gpu_share, default=0.0,
                   help="with --ray: GPUs per actor, each loading its model once onto its GPU (0.5: two actors share "
                        "one GPU; default 0: CPU actors)")


def add_device_options(p: argparse.ArgumentParser, batch: bool = True) -> None:
    """``--device``, ``--dtype`` (and ``--batch-size``): the commands that load a model to generate (sweep, atlas,
    demo). Checked when the command runs (``chatvec_lab.io.devices``): a device this machine lacks is one line."""
    p.add_argument("--device", default="auto",
                   help="auto (a GPU if there is one, else the CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's own, e.g. bfloat16), float32, bfloat16, "
                                                   "float16")
    if batch:
        p.add_argument("--batch-size", type=positive_int, default=None,
                       help="prompts generated together (default: every prompt of a cell, up to a memory-aware cap)")


def gpu_share(text: str) -> float:
    """GPUs per Ray actor: 0, a fraction up to 1, or a whole number."""
    from chatvec_lab.behaviour.grid import check_gpus_per_actor

    try:
        return check_gpus_per_actor(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus-per-actor is 0, a fraction up to 1 (e.g. 0.5) or a whole number, "
                                         f"not {text!r}") from None


def make_executor(ray: str | None, actors: int = 2, threads_per_actor: int = 1, gpus_per_actor: float = 0.0):
    """``--ray [ADDRESS] --actors N --threads-per-actor T --gpus-per-actor G`` → a ``RayExecutor``; without
    ``--ray``, None (the local executor)."""
    if ray:
        from chatvec_lab.behaviour.grid import RayExecutor

        return RayExecutor(address=ray, actors=actors, threads_per_actor=threads_per_actor,
                           gpus_per_actor=gpus_per_actor)
    if actors != 2 or threads_per_actor != 1 or gpus_per_actor:
        raise ChatVecError("--actors, --threads-per-actor and --gpus-per-actor go with --ray")
    return None
