"""Review round 3, the behaviour side: caches that cannot be written, overlapping outputs, signals that must not be
lost, quiet runs, early checks of --language / --max-new-tokens / --prompts, a target that holds NaN."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_lab import ChatVector, toy
from chatvec_lab.cli import main
from chatvec_lab.errors import ChatVecWarning, NonFiniteError, OutputError

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_vector(tmp_path_factory):
    out = tmp_path_factory.mktemp("vec") / "v"
    ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).save(out)
    return out


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Hallo, wie geht es dir?\nErzähl mir etwas über Hunde.\n", encoding="utf-8")
    return path


def _sweep_args(vector, prompts, csv, *extra):
    return ["sweep", "--target", toy.path("cp"), "--vector", vector, "--prompts", prompts, "--csv", csv,
            "--alphas", "0,1", "--max-new-tokens", "3", "--scorers", "ended_turn", "-q", *extra]


def test_a_cache_that_cannot_be_written_warns_and_the_csv_is_still_written(saved_vector, prompts, tmp_path, capsys,
                                                                            monkeypatch):
    """D9: a failed cache write aborted the sweep after all its work, and the CSV asked for was never written."""
    from chatvec_lab.behaviour import cache

    def full_disk(*args, **kwargs):
        raise OutputError("could not write the cache: No space left on device; nothing was written")

    monkeypatch.setattr(cache, "write_table", full_disk)
    rc, err = _cli(_sweep_args(saved_vector, prompts, tmp_path / "s.csv", "--cache-dir", tmp_path / "cache"), capsys)
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "s.csv")
    assert len(df) == 4 and sorted(set(df["alpha"])) == [0.0, 1.0]
    warnings_said = [line for line in err.splitlines() if "warning" in line]
    assert warnings_said == [warnings_said[0]] and "chatvec sweep: warning: the cache" in warnings_said[0]
    assert "No space left" in warnings_said[0]


def test_a_cache_that_cannot_be_written_warns_in_the_python_api(saved_vector, tmp_path, monkeypatch):
    from chatvec_lab.behaviour import cache, sweep as sweep_module

    monkeypatch.setattr(cache, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.warns(ChatVecWarning, match="cannot be written"):
        df = sweep_module.sweep(toy.path("cp"), ChatVector.load(saved_vector), [0.0], ["Hallo"], max_new_tokens=2,
                                scorers=["ended_turn"], cache_dir=tmp_path / "cache", progress=False)
    assert len(df) == 1


def test_csv_and_cache_dir_on_one_path_are_refused_before_any_work(saved_vector, prompts, tmp_path, capsys):
    """D10: the overlap was found only after the whole sweep, with advice (--overwrite) that failed again."""
    for csv, cache_dir in [(tmp_path / "same", tmp_path / "same"), (tmp_path / "c" / "s.csv", tmp_path / "c")]:
        rc, err = _cli(_sweep_args(saved_vector, prompts, csv, "--cache-dir", cache_dir), capsys)
        assert rc == 2 and "overlap" in err and "--csv" in err and "--cache-dir" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not Path(csv).exists() and not Path(cache_dir).exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, on purpose
def test_a_signal_whose_exception_was_swallowed_still_stops_the_output(tmp_path):
    """D11: SIGTERM arriving inside a finaliser raised there, Python ignored the exception, and the run went on to
    publish its output."""
    from chatvec_lab.io.output import atomic_folder
    from chatvec_lab.io.signals import Interrupted, received_signal

    class SignalledWhileFinalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes: inside this finaliser
                pass

    out = tmp_path / "out"
    with pytest.raises(Interrupted) as caught:
        with atomic_folder(out) as tmp:
            (tmp / "half.txt").write_text("written before the signal")
            obj = SignalledWhileFinalised()
            del obj  # the Interrupted raised inside __del__ is printed as "Exception ignored" and lost
            (tmp / "after.txt").write_text("the block went on")
    assert caught.value.signum == signal.SIGTERM and received_signal() == signal.SIGTERM
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "next") as tmp:  # a new run starts clean
        (tmp / "f").write_text("x")
    assert (tmp_path / "next" / "f").exists()


def test_sigterm_during_generation_is_one_line_and_leaves_nothing(saved_vector, tmp_path):
    """M10 and M4: SIGTERM during a sweep's generation killed the process with the default action (rc -15, no
    message); and -q still printed transformers' loading bar."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"Erzähl mir etwas über Nummer {i}." for i in range(6)), encoding="utf-8")
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "chatvec_lab.cli", "sweep", "--target", str(toy.path("cp")), "--vector",
           str(saved_vector), "--prompts", str(prompts), "--csv", str(tmp_path / "s.csv"), "--alphas", "0,0.5,1",
           "--seeds", "4", "--max-new-tokens", "40", "--cache-dir", str(cache), "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cache / "cells").is_dir() and any((cache / "cells").iterdir()):
            break  # a cell is done: the command is running its grid, well inside main
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["chatvec sweep: interrupted by SIGTERM; nothing half-written was left "
                                        "(outputs finished before it stay)"], err
    assert not (tmp_path / "s.csv").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("flag,value,words", [
    ("--language", "xx", "language 'xx' is not one langid tells apart"),
    ("--language", "", "language '' is not one langid"),
    ("--max-new-tokens", "0", "--max-new-tokens must be a positive integer"),
    ("--max-new-tokens", "-1", "--max-new-tokens must be a positive integer"),
])
def test_bad_language_and_length_are_refused_before_the_model_loads(saved_vector, prompts, tmp_path, capsys,
                                                                    monkeypatch, flag, value, words):
    """M3 and M8: --language xx gave an all-zero share_xx column; --max-new-tokens 0 failed after the model loaded,
    in transformers' words."""
    from chatvec_lab.behaviour import engines

    monkeypatch.setattr(engines, "load_target", lambda *a, **k: pytest.fail("the model was loaded"))
    args = _sweep_args(saved_vector, prompts, tmp_path / "s.csv")
    args[args.index("--scorers") + 1] = "ended_turn,language"
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(SystemExit) if flag == "--max-new-tokens" else _nothing():
        rc, err = _cli(args, capsys)
    if flag == "--max-new-tokens":
        err = capsys.readouterr().err
    else:
        assert rc == 2
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s.csv").exists()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_language_other_than_german_is_scored(tmp_path):
    from chatvec_lab.behaviour.scoring import LanguageScorer
    scored = LanguageScorer("fr").score(["Bonjour, je voudrais un café, s'il vous plaît.", "Good morning to you."])
    assert list(scored.columns) == ["language", "share_fr"]
    assert scored["share_fr"].tolist() == [1.0, 0.0]


def test_a_prompt_folder_is_named_as_a_folder(tmp_path):
    """M9: a folder given as --prompts was reported as 'not found'."""
    from chatvec_lab.behaviour.sweep import read_prompts
    from chatvec_lab.errors import UsageError
    with pytest.raises(UsageError, match="is a folder"):
        read_prompts(tmp_path)


def test_demo_refuses_to_write_inside_the_installed_package(tmp_path, capsys):
    """M1: `chatvec demo -o <the package>/x` wrote its report inside the package's code folder."""
    import chatvec_lab
    inside = Path(chatvec_lab.__file__).parent / "report-here"
    rc, err = _cli(["demo", "-o", inside, "--quick"], capsys)
    assert rc == 2 and "chatvec_lab" in err and len(err.strip().splitlines()) == 1, err
    assert not inside.exists()


def test_a_target_holding_nan_is_named_not_the_alpha(saved_vector, tmp_path):
    """D13: a NaN in the target was reported as 'at coefficients v=0.0 … a coefficient too large?'."""
    from chatvec_lab.behaviour.sweep import sweep
    cp = tmp_path / "cp-nan"
    shutil.copytree(toy.path("cp"), cp)
    weights = load_file(cp / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, cp / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError) as caught:
        sweep(cp, ChatVector.load(saved_vector), [0.0], ["Hallo"], max_new_tokens=3, scorers=["ended_turn"],
              progress=False, dtype="float32")
    msg = str(caught.value)
    assert f"tensor {name!r} holds 1 NaN/Inf values in the target's own weights" in msg
    assert "coefficient" not in msg and "α" not in msg


def test_messages_escape_control_characters_and_paths_are_not_flags():
    """Review round 4 (K, L): text from a tampered file sent terminal escapes raw; a hub cache path
    (models--org--name) was read as flags the command lacks."""
    from chatvec_lab.cli import build_parser, flags_of_this_command
    from chatvec_lab.errors import one_line

    assert one_line("bad \x1b[31mRED\x1b[0m \x00 ü") == "bad \\x1b[31mRED\\x1b[0m \\x00 ü"
    message = "cannot read hf/hub/models--fake--base/snapshots/x"
    assert flags_of_this_command(message, build_parser(), "merge") == message
    assert "has no --embeddings" in flags_of_this_command("use --embeddings skip", build_parser(), "merge")


@pytest.mark.parametrize("command", ["sweep", "compare"])
def test_a_file_output_spelled_as_a_folder_is_refused(tmp_path, capsys, command, monkeypatch):
    """`--csv out/` wrote a file named out (Path() drops the separator): refused in check_output_path itself."""
    monkeypatch.chdir(tmp_path)
    vec = tmp_path / "cv"
    ChatVector.from_models(toy.path("base"), toy.path("chat")).save(vec)
    (tmp_path / "p.txt").write_text("Hallo\n", encoding="utf-8")
    args = (["sweep", "--target", toy.path("cp"), "--vector", vec, "--alphas", "0", "--prompts", "p.txt",
             "--max-new-tokens", "2", "--csv", "out/", "-q"] if command == "sweep"
            else ["compare", vec, "--csv", "out/", "-q"])
    rc, err = _cli(args, capsys)
    assert rc == 2 and "--csv out/ ends in a path separator" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
