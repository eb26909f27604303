"""Notebooks 1-6 run on a real model by changing their configure cell alone, device and dtype included (issue 25).

Each configure cell names ``DEVICE`` and ``DTYPE`` (``"auto"``: what every notebook computed before, on the toy), and
every call of the notebook that loads a model or generates passes both on; the library functions those calls reach
(``apply_to_model``, the coefficient panel, the exercise checks and their helpers) act on them: a dtype gives
parameters of that dtype, and a device this machine lacks is one line (a UsageError) before anything loads.
"""
from __future__ import annotations

import ast
import json

import pytest
import torch

from chatvec_lab import ChatVector, toy
from chatvec_lab.errors import UsageError
from chatvec_lab.io.resources import notebook_dir

GENERATING = ("01_quickstart", "03_sources", "04_sweep", "05_safety", "06_ablations")
LOADS = {"load_target", "apply_to_model", "compare_families", "CoefficientPanel"}  # always load or place a model
RUNS = {"sweep", "atlas", "rank_curve", "merge_sweep"}  # load a folder, or run a model already placed
EXERCISES_THAT_RUN_MODELS = {"turn_end_half", "german_share_trend", "perplexity_cost", "refusal_rates",
                             "multi_turn_ends", "blocks_only_turn_end"}


def _code_cells(name: str) -> list[str]:
    nb = json.loads((notebook_dir() / f"{name}.ipynb").read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _configure_markdown(name: str) -> str:
    nb = json.loads((notebook_dir() / f"{name}.ipynb").read_text(encoding="utf-8"))
    first_code = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    return "".join(nb["cells"][first_code - 1]["source"])


def _called(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _passes_device_and_dtype(node: ast.Call) -> bool:
    given = {k.arg: k.value for k in node.keywords}
    return all(isinstance(given.get(k), ast.Name) and given[k].id == v for k, v in (("device", "DEVICE"),
                                                                                     ("dtype", "DTYPE")))


def _calls(name: str):
    for source in _code_cells(name):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                yield source, node


def _placed(name: str) -> set[str]:
    """Names a notebook binds to a model it placed itself: ``x, tok = load_target(...)``, ``x, _ = apply_to_model``."""
    names = set()
    for source in _code_cells(name):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    _called(node.value) in {"load_target", "apply_to_model"}:
                target = node.targets[0]
                first = target.elts[0] if isinstance(target, ast.Tuple) else target
                if isinstance(first, ast.Name):
                    names.add(first.id)
    return names


@pytest.mark.parametrize("name", GENERATING)
def test_configure_cell_names_device_and_dtype_and_every_load_passes_them(name):
    namespace: dict = {}
    exec(compile(_code_cells(name)[0], f"<{name} configure cell>", "exec"), namespace)
    # the defaults reproduce what the notebook computed before: every model there was loaded in its own dtype
    # (the toy's bfloat16), and sweep / atlas / load_target already defaulted to "auto"
    assert namespace["DEVICE"] == "auto" and namespace["DTYPE"] == "auto", name
    prose = _configure_markdown(name)
    assert "`DEVICE`" in prose and "`DTYPE`" in prose and "real models" in prose, name
    placed = _placed(name)
    checked = 0
    for source, node in _calls(name):
        what = _called(node)
        if what in LOADS:
            assert _passes_device_and_dtype(node), f"{name}: {ast.get_source_segment(source, node)}"
            checked += 1
        elif what in RUNS:
            runs_placed = any(k.arg == "live" for k in node.keywords) or (
                node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in placed)
            assert runs_placed or _passes_device_and_dtype(node), f"{name}: {ast.get_source_segment(source, node)}"
            checked += 1
        elif what == "from_pretrained":  # a tokenizer may be loaded so; a model would ignore DEVICE and DTYPE
            assert "Tokenizer" in ast.get_source_segment(source, node.func), f"{name}: a model loaded without DEVICE"
        elif what == "check" and node.args and isinstance(node.args[0], ast.Constant) and \
                node.args[0].value in EXERCISES_THAT_RUN_MODELS:
            assert _passes_device_and_dtype(node), f"{name}: {ast.get_source_segment(source, node)}"
    assert checked, f"{name} loads no model: it needs no DEVICE / DTYPE"


def test_notebook_2_loads_no_model_and_says_so():
    for source, node in _calls("02_anatomy"):
        assert _called(node) not in LOADS | RUNS | {"from_pretrained", "generate"}, ast.get_source_segment(source, node)
    assert "DEVICE" not in "".join(_code_cells("02_anatomy")).replace("# no DEVICE / DTYPE", "")
    assert "no `DEVICE` / `DTYPE`" in _configure_markdown("02_anatomy")


def test_the_exercises_that_run_models_take_device_and_dtype_and_their_solutions_pass_them():
    from chatvec_lab.course import exercises as ex
    from chatvec_lab.course._solutions import SOLUTIONS

    session_one = {"01", "02", "03", "04", "05", "06"}
    takes = {name for name, e in ex.EXERCISES.items() if "device" in e.params and e.notebook[:2] in session_one}
    assert takes == EXERCISES_THAT_RUN_MODELS
    for name in takes:
        assert ex.EXERCISES[name].params["device"] == ex.EXERCISES[name].params["dtype"] == "auto"
        assert "device=DEVICE, dtype=DTYPE" in ex.EXERCISES[name].question, name
        assert "device=DEVICE" in SOLUTIONS[name] and "dtype=DTYPE" in SOLUTIONS[name], name


# -- the library acts on device and dtype ----------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine, whatever it has, as one without a GPU: "cuda" must then be refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)


def _dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def test_apply_to_model_loads_in_the_dtype_asked_and_moves_to_the_device(cv):
    from chatvec_lab import apply_to_model

    as_stored, _ = apply_to_model(toy.path("cp"), [(cv, 1.0)])
    assert _dtypes(as_stored) == {torch.bfloat16}  # the default: the checkpoint's own, as before
    for asked, dtype in [("float32", torch.float32), ("bf16", torch.bfloat16), ("auto", torch.bfloat16)]:
        model, _ = apply_to_model(toy.path("cp"), [(cv, 1.0)], device="cpu", dtype=asked)
        assert _dtypes(model) == {dtype}, asked
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    wide, _ = apply_to_model(toy.path("cp"), [(cv, 1.0)], dtype="float32")
    narrow, _ = apply_to_model(toy.path("cp"), [(cv, 1.0)], dtype="bfloat16")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(dict(narrow.named_parameters())[name], dict(wide.named_parameters())[name].bfloat16())


def test_apply_to_model_refuses_a_missing_device_or_dtype_in_one_line_before_loading(cv, no_gpu, monkeypatch):
    import transformers

    from chatvec_lab import apply_to_model

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    for bad in [dict(device="cuda"), dict(device="tpu"), dict(dtype="float64"), dict(dtype="nope")]:
        with pytest.raises(UsageError) as e:
            apply_to_model(toy.path("cp"), [(cv, 1.0)], **bad)
        assert "\n" not in str(e.value) and str(next(iter(bad.values()))) in str(e.value), bad


def test_turn_end_rate_loads_where_it_is_told(cv, no_gpu):
    from chatvec_lab.course.measuring import turn_end_rate

    for bad in [dict(device="cuda"), dict(dtype="nope")]:
        with pytest.raises(UsageError):
            turn_end_rate(toy.path("cp"), cv, 1.0, ["Hallo"], seed=0, max_new_tokens=2, **bad)
    assert 0 <= turn_end_rate(toy.path("cp"), cv, 1.0, ["Hallo"], seed=0, max_new_tokens=2, device="cpu",
                              dtype="float32") <= 1


@pytest.mark.parametrize("name", sorted(EXERCISES_THAT_RUN_MODELS))
def test_the_exercise_checks_measure_on_the_device_given(name, no_gpu, tmp_path, monkeypatch):
    """A check given device="cuda" on a machine without one refuses it: the device reaches the models it loads."""
    from chatvec_lab.course import exercises as ex
    from chatvec_lab.toy.evaluate import prompt_sets

    monkeypatch.chdir(tmp_path)  # the sweeps' cache_dir, .cache/sweeps, is relative
    answers = {"turn_end_half": ({"prediction": 0.5, "measured": 0.5}, {}),
               "german_share_trend": ({"share_de": [1.0] * 5, "falls_steadily": True}, {"seed": 3}),
               "perplexity_cost": (1.5, {"alpha": 2.0}),
               "refusal_rates": ({"chat": 0.5, "cp_cv": 0.0}, {"prompts": prompt_sets()["offensive"][:8], "seed": 2}),
               "multi_turn_ends": ([0.5, 0.5, 0.5], {}),
               "blocks_only_turn_end": ({"full": 0.5, "blocks_only": 0.0}, {})}
    answer, choices = answers[name]
    for bad in [dict(device="cuda"), dict(dtype="nope")]:
        with pytest.raises(UsageError):
            ex.check(name, answer, **choices, **bad)


def test_the_panel_loads_a_folder_in_the_dtype_asked_and_checks_a_model_given(cv, no_gpu):
    from chatvec_lab.behaviour.sweep import load_target
    from chatvec_lab.course.widgets import CoefficientPanel, panel_model

    prompts = {"chat": ["Hallo"]}
    panel = CoefficientPanel(toy.path("cp"), None, {"chat": cv}, prompts, device="cpu", dtype="float32",
                             auto_run=False)
    assert _dtypes(panel.live.model) == {torch.float32} and panel.tokenizer is not None
    assert _dtypes(CoefficientPanel(toy.path("cp"), None, {"chat": cv}, prompts).live.model) == {torch.bfloat16}
    model, tokenizer = load_target(toy.path("cp"), device="cpu", dtype="bfloat16")
    assert panel_model(model, tokenizer, device="auto", dtype="auto") == (model, tokenizer)  # where it is: fine
    for bad, says in [(dict(dtype="float32"), "bfloat16"), (dict(device="cuda"), "cuda")]:
        with pytest.raises(UsageError) as e:
            CoefficientPanel(model, tokenizer, {"chat": cv}, prompts, **bad)
        assert says in str(e.value) and "\n" not in str(e.value)
