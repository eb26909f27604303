"""``chatvec eval`` / ``evaluate_harness``: the live model at each α through lm-evaluation-harness, on the task
shipped with the lab (offline), as a tidy table; α = 0 is the untouched target and α = 1 is ``chatvec apply``'s
checkpoint, evaluated by the harness on its own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: the shipped task needs no network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, Unavailable, apply_vectors, evaluate_harness, toy
from chatvec_lab.behaviour.engines import load_target
from chatvec_lab.cli import main

TASK = "chatvec_toy_de_en"
LIMIT = 24  # of the task's 40 items
ALPHAS = [0.0, 1.0]


@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).materialize()


@pytest.fixture(scope="module")
def cv_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("vector") / "cv"
    assert main(["extract", "--base", str(toy.path("base")), "--chat", str(toy.path("chat")), "-o", str(out),
                 "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def table(cv):
    return evaluate_harness(toy.path("cp"), cv, ALPHAS, [TASK], limit=LIMIT, progress=False)


def harness_alone(model_folder) -> dict[str, float]:
    """The harness on a checkpoint by itself (its own HFLM around the loaded model, no LiveModel, no chatvec
    table): ``{metric: value}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from chatvec_lab.behaviour.harness import task_manager

    model, tokenizer = load_target(model_folder)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager([TASK]), limit=LIMIT,
                                      log_samples=False)["results"][TASK]
    return {k.split(",")[0]: v for k, v in results.items() if k.endswith(",none") and "_stderr" not in k}


def values_at(df: pd.DataFrame, alpha: float) -> dict[str, float]:
    rows = df[df["alpha"] == alpha]
    return dict(zip(rows["metric"], rows["value"]))


def test_table_is_tidy_and_in_range(table):
    assert list(table.columns) == ["task", "metric", "alpha", "value", "stderr"]
    assert len(table) == 2 * len(ALPHAS) and not table.duplicated(["task", "metric", "alpha"]).any()
    assert set(table["task"]) == {TASK} and set(table["metric"]) == {"acc", "acc_norm"}
    assert sorted(set(table["alpha"])) == ALPHAS
    assert table["value"].between(0, 1).all()
    assert (table["stderr"] >= 0).all() and table["stderr"].notna().all()
    # cp knows German: it picks the German ending of most items (its base, English only, of almost none)
    assert values_at(table, 0.0)["acc_norm"] > 0.75


def test_alpha_0_is_the_target_and_alpha_1_is_the_applied_checkpoint(table, cv, tmp_path):
    assert values_at(table, 0.0) == harness_alone(toy.path("cp"))
    apply_vectors(toy.path("cp"), [(cv, 1.0)], out=tmp_path / "cp-cv")
    assert values_at(table, 1.0) == harness_alone(tmp_path / "cp-cv")
    assert values_at(table, 0.0) != values_at(table, 1.0)  # the two checks above tell the αs apart


def test_a_model_given_is_left_as_found_and_user_tasks_load_from_their_folder(table, cv, tmp_path):
    from chatvec_lab.io.resources import harness_task_dir

    model, tokenizer = load_target(toy.path("cp"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the shipped task copied elsewhere under another name: its data is read from beside its own YAML
    mine = tmp_path / "tasks" / "mine"
    shutil.copytree(harness_task_dir() / TASK, mine)
    yaml = mine / f"{TASK}.yaml"
    yaml.write_text(yaml.read_text().replace(f"task: {TASK}", "task: my_de_en"))
    df = evaluate_harness(model, {"chat": cv, "again": cv}, [{"chat": 1.0, "again": 0.0}], "my_de_en",
                          tokenizer=tokenizer, limit=LIMIT, include_path=tmp_path / "tasks", progress=False)
    assert list(df.columns) == ["task", "metric", "alpha", "alpha_chat", "alpha_again", "value", "stderr"]
    assert set(df["task"]) == {"my_de_en"} and (df["alpha_again"] == 0).all()
    assert values_at(df, 1.0) == values_at(table, 1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_task_is_one_line_before_the_model_loads(cv_folder, capsys, monkeypatch):
    from chatvec_lab.behaviour import engines

    monkeypatch.setattr(engines, "load_target", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["eval", "--target", str(toy.path("cp")), "--vector", str(cv_folder), "--tasks",
               f"{TASK},chatvec_toy_de_een", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("chatvec eval: error: unknown harness task")
    assert "'chatvec_toy_de_een'" in err and "did you mean chatvec_toy_de_en" in err


def test_cli_offline_csv_plot_and_no_overwrite(table, cv_folder, tmp_path, capsys):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["eval", "--target", toy.path("cp"), "--vector", cv_folder, "--alphas", "0,1", "--tasks", TASK,
            "--limit", LIMIT, "--csv", "out.csv", "--plot", "out.png", "-q"]
    p = subprocess.run([sys.executable, "-m", "chatvec_lab.cli", *map(str, args)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    df = pd.read_csv(tmp_path / "out.csv")
    pd.testing.assert_frame_equal(df, table)
    assert "acc_norm" in p.stdout and "wrote out.csv (4 rows)" in p.stdout
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_before = (tmp_path / "out.csv").read_bytes()
    # an existing --csv is refused before any work, in one line, and left as it was
    rc = main([str(a) for a in args[:-5]] + ["--csv", str(tmp_path / "out.csv"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert (tmp_path / "out.csv").read_bytes() == csv_before


def test_without_the_harness_says_how_to_install_it(cv, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(Unavailable, match=r"pip install 'chatvec_lab\[eval\]'"):
        evaluate_harness(toy.path("cp"), cv, [0], [TASK])
    rc = main(["eval", "--target", str(toy.path("cp")), "--vector", str(tmp_path), "--tasks", TASK])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "chatvec eval needs lm-eval" in err


def test_plot_eval_draws_a_line_per_task_and_metric():
    from chatvec_lab.plots import plot_eval

    df = pd.DataFrame({"task": ["t"] * 4 + ["u"] * 2, "metric": ["acc", "acc", "f1", "f1", "acc", "acc"],
                       "alpha": [0, 1, 0, 1, 0, 1], "value": [0.5, 0.7, 0.2, 0.1, 0.9, 0.8],
                       "stderr": [0.1, 0.1, float("nan"), 0.05, 0.02, 0.02]})
    ax = plot_eval(df).axes[0]
    assert [c.get_label() for c in ax.containers] == ["t · acc", "t · f1", "u · acc"]  # a line with error bars each
    assert list(ax.containers[0].lines[0].get_ydata()) == [0.5, 0.7]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["t · acc", "t · f1", "u · acc"]
    ax = plot_eval(df, metrics=["f1"]).axes[0]
    assert [c.get_label() for c in ax.containers] == ["t · f1"]
