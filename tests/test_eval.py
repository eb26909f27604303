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

from chatvec_lab import ChatVecError, ChatVector, Unavailable, apply_vectors, evaluate_harness, toy
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


# ------------------------------------------------------------------ refusals: one line, before the work


def no_work(monkeypatch, evaluation: bool = True):
    """Make loading a model (and with ``evaluation``, the CLI's call of the evaluation) fail the test: a refusal
    must come first."""
    from chatvec_lab.behaviour import engines, harness

    monkeypatch.setattr(engines, "load_target", lambda *a, **k: pytest.fail("the model was loaded"))
    if evaluation:
        monkeypatch.setattr(harness, "evaluate_harness", lambda *a, **k: pytest.fail("the evaluation ran"))


def eval_cli(cv_folder, *more, tasks=TASK, alphas="0") -> list[str]:
    return ["eval", "--target", str(toy.path("cp")), "--vector", str(cv_folder), "--alphas", alphas, "--tasks", tasks,
            "--limit", "2", "-q", *map(str, more)]


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("chatvec eval: error: "), err
    return err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("plot", ["./sub/../x.out", "alias/x.out"])
def test_csv_and_plot_naming_one_file_are_refused_up_front(cv_folder, tmp_path, monkeypatch, capsys, plot, overwrite):
    (tmp_path / "alias").symlink_to(tmp_path)  # a linked folder: alias/x.out is x.out
    monkeypatch.chdir(tmp_path)
    no_work(monkeypatch)
    err = one_line_error(capsys, main(eval_cli(cv_folder, "--csv", "x.out", "--plot", plot, *overwrite)))
    assert "overlap" in err and "--csv x.out" in err and f"--plot {plot}" in err
    assert not (tmp_path / "x.out").exists()


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_an_output_ending_in_a_separator_is_refused(cv_folder, tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    no_work(monkeypatch)
    err = one_line_error(capsys, main(eval_cli(cv_folder, flag, "newdir/")))
    assert f"{flag} newdir/ ends in a path separator" in err
    assert not (tmp_path / "newdir").exists()


def user_task(folder, name: str, yaml_from=(), yaml_add: str = "", files=None) -> None:
    """The shipped task copied to ``folder`` as task ``name``: its YAML with each (old, new) of ``yaml_from``
    replaced and ``yaml_add`` appended; ``files``: more files beside it."""
    from chatvec_lab.io.resources import harness_task_dir

    shutil.copytree(harness_task_dir() / TASK, folder)
    yaml = folder / f"{TASK}.yaml"
    text = yaml.read_text().replace(f"task: {TASK}", f"task: {name}")
    for old, new in yaml_from:
        assert old in text
        text = text.replace(old, new)
    yaml.write_text(text + yaml_add)
    for file, content in (files or {}).items():
        (folder / file).write_text(content)


LOADER = ("chatvec_lab.behaviour.harness.local_dataset", "broken.load")


@pytest.mark.parametrize("change, says", [
    (dict(yaml_add="foo: 1\n"), "TypeError: TaskConfig.__init__() got an unexpected keyword argument 'foo'"),
    (dict(yaml_from=[("{{context}}", "{{nosuchfield}}")]), "UndefinedError: 'nosuchfield' is undefined"),
    (dict(yaml_from=[LOADER], files={"broken.py": "def load(**kw):\n    raise RuntimeError('loader broke')\n"}),
     "RuntimeError: loader broke"),
])
def test_a_user_task_the_harness_cannot_build_is_one_line(cv_folder, tmp_path, monkeypatch, capsys, change, says):
    from chatvec_lab.errors import UsageError

    user_task(tmp_path / "tasks" / "t", "t_broken", **change)
    no_work(monkeypatch, evaluation=False)
    err = one_line_error(capsys, main(eval_cli(cv_folder, "--include-path", tmp_path / "tasks", tasks="t_broken")))
    assert "harness task t_broken failed while loading" in err and says in err
    with pytest.raises(UsageError, match="t_broken failed while loading") as caught:
        evaluate_harness(toy.path("cp"), cv_folder, [0], ["t_broken"], include_path=tmp_path / "tasks")
    assert says in str(caught.value)


def test_a_user_task_that_fails_while_evaluated_is_one_line(cv, tmp_path):
    from chatvec_lab.errors import UsageError

    user_task(tmp_path / "t", "t_late", yaml_add="process_results: !function broken.score\n",
              files={"broken.py": "def score(doc, results):\n    raise RuntimeError('scoring broke')\n"})
    with pytest.raises(UsageError, match=r"harness task t_late failed while being evaluated at α 0 \(raised by "
                                         r"lm-eval\): RuntimeError: scoring broke"):
        evaluate_harness(toy.path("cp"), cv, [0, 1], ["t_late"], limit=2, include_path=tmp_path, progress=False)


@pytest.mark.parametrize("raised", [MemoryError, KeyboardInterrupt])
def test_memory_errors_and_interrupts_in_a_task_pass_as_they_are(cv_folder, tmp_path, monkeypatch, raised):
    user_task(tmp_path / "t", "t_raises", yaml_from=[LOADER],
              files={"broken.py": f"def load(**kw):\n    raise {raised.__name__}()\n"})
    no_work(monkeypatch, evaluation=False)
    with pytest.raises(raised):
        evaluate_harness(toy.path("cp"), cv_folder, [0], ["t_raises"], include_path=tmp_path)


def test_a_lab_error_in_a_task_keeps_its_own_message(cv_folder, tmp_path, monkeypatch, capsys):
    user_task(tmp_path / "t", "t_empty", yaml_from=[("de_en.jsonl", "empty.jsonl")], files={"empty.jsonl": "\n"})
    no_work(monkeypatch, evaluation=False)
    err = one_line_error(capsys, main(eval_cli(cv_folder, "--include-path", tmp_path, tasks="t_empty")))
    assert err == f"chatvec eval: error: {tmp_path / 't' / 'empty.jsonl'} holds no items\n"


def test_more_few_shot_examples_than_documents_is_refused(cv_folder, monkeypatch, capsys):
    no_work(monkeypatch, evaluation=False)
    err = one_line_error(capsys, main(eval_cli(cv_folder, "--num-fewshot", "1000")))
    assert f"harness task '{TASK}' has only 40 document(s) to draw few-shot examples from" in err
    assert "--num-fewshot" in err and "1000" in err and "Sample larger" not in err


def test_an_unknown_task_names_the_include_path_yaml_that_failed(cv_folder, tmp_path, monkeypatch, capsys):
    bad = {"syntax": "task: t_bad\n  : : [unclosed\n", "cycle": "task: t_cycle\ninclude: t.yaml\n",
           "python": "task: t_py\ndataset_path: !!python/object/apply:os.getcwd []\n"}
    for folder, text in bad.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.yaml").write_text(text)
    user_task(tmp_path / "fine", "t_fine")
    no_work(monkeypatch, evaluation=False)
    err = one_line_error(capsys, main(eval_cli(cv_folder, "--include-path", tmp_path, tasks="t_cycle")))
    assert "unknown harness task 't_cycle'" in err and "3 YAML file(s) of the include path could not be loaded" in err
    for folder, kind in (("syntax", "ParserError"), ("cycle", "ValueError: Include cycle"),
                         ("python", "ConstructorError")):
        assert f"{tmp_path / folder / 't.yaml'} ({kind}" in err
    assert "fine" not in err.split("could not be loaded")[1]


def test_an_alpha_listed_twice_is_refused_in_eval_s_own_words(cv_folder, monkeypatch, capsys):
    no_work(monkeypatch, evaluation=False)
    err = one_line_error(capsys, main(eval_cli(cv_folder, alphas="0,0,1")))
    assert "α 0 is listed twice" in err and "seed" not in err and "pooled" not in err


def test_a_target_with_another_vocabulary_is_told_what_is_wrong(cv):
    from chatvec_lab.errors import MismatchError

    with pytest.raises(MismatchError, match="vocabulary sizes differ") as caught:
        evaluate_harness(toy.path("cp-xvocab"), cv, [0], [TASK], limit=2, progress=False)
    assert "has no tokenizer" not in str(caught.value) and "a live model" in str(caught.value)
    table = evaluate_harness(toy.path("cp-xvocab"), cv, [1], [TASK], limit=2, progress=False, embeddings="skip")
    assert set(table["alpha"]) == {1.0}


@pytest.mark.parametrize("change, says", [
    (dict(tasks=5), "tasks must be harness task names"),
    (dict(vectors=None), "vectors must be"),
    (dict(foo=1), "unknown keyword argument 'foo'"),
    (dict(model="x"), "sets simple_evaluate's 'model' itself"),
    (dict(limit=1.5), "limit is a number of items per task"),
])
def test_python_arguments_are_checked_before_the_model_loads(cv_folder, monkeypatch, change, says):
    from chatvec_lab.errors import UsageError

    no_work(monkeypatch)
    args = dict(target=toy.path("cp"), vectors=cv_folder, alphas=[0], tasks=[TASK]) | change
    with pytest.raises(UsageError, match=says):
        evaluate_harness(**args)


def test_limit_has_one_rule_in_python_and_on_the_command_line():
    import argparse

    from chatvec_lab.behaviour.harness import check_limit
    from chatvec_lab.cli.evaluate import item_limit
    from chatvec_lab.errors import UsageError

    for text in ["1", "2.0", "50", "0.5", "1.5", "0", "-1", "nan", "inf", "1e-9", "0.999"]:
        try:
            cli = item_limit(text)
        except argparse.ArgumentTypeError:
            cli = "refused"
        try:
            python = check_limit(float(text))
        except UsageError:
            python = "refused"
        assert cli == python, text
    assert check_limit(2.0) == 2 and isinstance(check_limit(2.0), int)


@pytest.mark.parametrize("make", ["fifo", "loop", "file", "int", "empty"])
def test_a_hostile_include_path_is_one_line_and_never_hangs(cv_folder, tmp_path, make):
    """Review round 4 (N2, E, F, J): a FIFO named t.yaml in the include folder hung eval for ever; a link loop was a
    traceback; a file, an int or "" was accepted or a TypeError."""
    import os

    folder = tmp_path / "tasks"
    folder.mkdir()
    include = folder
    if make == "fifo":
        os.mkfifo(folder / "t.yaml")
    elif make == "loop":
        (folder / "loop.yaml").symlink_to(folder / "loop.yaml")
    elif make == "file":
        include = folder / "t.yaml"
        include.write_text("task: t\n")
    elif make == "int":
        include = 5
    else:
        include = ""
    with pytest.raises(ChatVecError) as e:
        evaluate_harness(toy.path("cp"), cv_folder, [0], ["chatvec_toy_de_en"], limit=2, include_path=include)
    assert "\n" not in str(e.value) and "include path" in str(e.value)


def test_eval_takes_the_embeddings_policy_its_message_names(cv_folder, capsys):
    """Review round 4 (I): the error named --embeddings skip|shared, then said chatvec eval had no such flag."""
    args = ["eval", "--target", str(toy.path("cp-xvocab")), "--vector", str(cv_folder), "--tasks",
            "chatvec_toy_de_en", "--alphas", "0", "--limit", "2", "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--embeddings skip|shared" in err and "has no --embeddings" not in err
    assert main([*args, "--embeddings", "skip"]) == 0
