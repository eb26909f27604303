"""The notebooks' exercises: every solution passes its check, a wrong answer fails it with a hint that does not
give the answer away, a blank answer is "not answered yet", and the common mistakes get their own hints."""
from __future__ import annotations

import math

import pytest
import torch

from chatvec_lab import exercises as ex
from chatvec_lab import toy
from chatvec_lab._solutions import SOLUTIONS

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = {"BASE": toy.path("base"), "CHAT": toy.path("chat"), "CHAT_ALT": toy.path("chat-alt"), "CP": toy.path("cp")}
CONTEXT = {"base": MODELS["BASE"], "chat": MODELS["CHAT"], "chat_alt": MODELS["CHAT_ALT"], "cp": MODELS["CP"]}


def _context(name: str) -> dict:
    return {k: v for k, v in CONTEXT.items() if k in ex.EXERCISES[name].params}


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """Every solution run once, as a student would run it in place of the exercise cell (sweeps cache in a temporary
    folder): ``{name: (answer, printed text)}``."""
    import contextlib
    import io

    work = tmp_path_factory.mktemp("exercises")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for name in ex.names():
            namespace = dict(MODELS)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(SOLUTIONS[name], f"<solution {name}>", "exec"), namespace)
            out[name] = (namespace["answer"], printed.getvalue())
    return out


def _far(rate: float) -> float:
    """A rate at least a third away from ``rate``: several replies off at any sample size used here."""
    return rate + 0.5 if rate < 0.5 else rate - 0.5


def _wrong(name: str, answer):
    """A wrong answer of the right type, derived from the right one."""
    if name == "language_vector_by_hand":
        return answer + 1e-3
    if name == "turn_end_half":
        return {"prediction": answer["prediction"], "measured": _far(answer["measured"])}
    if name in ("relative_change", "effective_rank", "perplexity_cost"):
        return answer * 1.1
    if name in ("cosine_one_tensor", "layer_cosine"):
        return answer + 0.05
    if name == "german_share_threshold":
        grid = [0.0, 0.5, 1.0, 1.5, 2.0]
        return 0.0 if answer == "none" else grid[(grid.index(answer) + 1) % len(grid)]
    if name == "refusal_rates":
        return tuple(_far(r) for r in answer)
    if name == "multi_turn_ends":
        return [_far(r) for r in answer]
    if name == "cosine_driver":
        return "blocks" if answer != "blocks" else "lm_head"
    if name == "blocks_only_turn_end":
        return {k: _far(v) for k, v in answer.items()}
    raise KeyError(f"add a wrong answer for the new exercise {name!r}")


def test_every_exercise_is_complete():
    assert len(ex.names()) >= 12 and set(SOLUTIONS) == set(ex.names())
    from chatvec_lab.resources import notebook_dir

    for e in ex.EXERCISES.values():
        assert (notebook_dir() / f"{e.notebook}.ipynb").is_file(), e.name
        assert e.title and e.question and e.hints, e.name
        assert f'ex.check("{e.name}"' in SOLUTIONS[e.name], f"the solution of {e.name} must end with its check"
    per_notebook = {}
    for e in ex.EXERCISES.values():
        per_notebook.setdefault(e.notebook, []).append(e.name)
    assert len(per_notebook) == 6 and all(2 <= len(v) <= 3 for v in per_notebook.values()), per_notebook


def test_the_data_helpers_agree_with_the_toy_package():
    """exercises.py finds the models, prompts and held-out text itself (its import layer is below toy)."""
    from chatvec_lab.toy.evaluate import heldout_texts, prompt_sets

    for key, member in ex._MODEL_KEYS.items():
        assert ex._toy_path(member) == toy.path(member)
    assert ex._prompts("chat") == prompt_sets()["chat"] and ex._prompts("offensive") == prompt_sets()["offensive"]
    assert ex._heldout("de") == heldout_texts()["de"] and ex._heldout("en") == heldout_texts()["en"]


@pytest.mark.parametrize("name", ex.names())
def test_blank_answers_are_not_answered_yet(name, capsys):
    for blank in (None, ..., {"a": ...}, [None, 0.5], ()):
        result = ex.check(name, blank, **_context(name))
        assert result.ok is None and not result
        assert "not answered yet" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ex.names())
def test_solution_passes_and_a_wrong_answer_fails(name, solved, capsys, tmp_path, monkeypatch):
    answer, printed = solved[name]
    assert f"✓ {name}: right." in printed, printed
    assert ex._RESULTS[name].ok is True

    monkeypatch.chdir(tmp_path)
    shown = ex.solution(name)
    assert shown == SOLUTIONS[name] and SOLUTIONS[name] in capsys.readouterr().out

    result = ex.check(name, answer, **_context(name))
    assert result.ok is True and result and "✓" in capsys.readouterr().out

    wrong = _wrong(name, answer)
    result = ex.check(name, wrong, **_context(name))
    out = capsys.readouterr().out
    assert result.ok is False and not result, out
    assert out.startswith(f"✗ {name}: not yet.") and f"ex.hint({name!r})" in out
    truths = answer.values() if isinstance(answer, dict) else answer if isinstance(answer, (list, tuple)) else [answer]
    for t in truths:  # the hint never prints the right number
        if isinstance(t, float) and t not in (0.0, 1.0) and not math.isclose(t, 0.5):
            assert f"{t:.3f}" not in out, out

    result = ex.check(name, "not a number at all" if name != "cosine_driver" else 3.0, **_context(name))
    assert result.ok is False and "Traceback" not in capsys.readouterr().out


# -- the common mistakes get their own hint: a check that only compared numbers would fail these -------------

NAME = "model.layers.0.mlp.up_proj.weight"


def _state(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_language_vector_mistakes(capsys):
    base, cp = _state(MODELS["BASE"])[NAME], _state(MODELS["CP"])[NAME]
    ctx = _context("language_vector_by_hand")
    right = cp.float() - base.float()
    assert ex.check("language_vector_by_hand", right, **ctx)
    cases = [(base.float() - cp.float(), "sign"), ((cp - base).float(), "float32"), (cp.float(), "CP's weight"),
             (right[:10], "shape"), (right.double(), "dtype"),
             (_state(MODELS["CHAT"])[NAME].float() - base.float(), "that is the chat vector"),
             (right.numpy().tolist(), "should be a tensor")]
    for answer, hint in cases:
        result = ex.check("language_vector_by_hand", answer, **ctx)
        assert result.ok is False and hint in capsys.readouterr().out, hint


def test_number_mistakes_get_their_hints(capsys):
    from chatvec_lab import ChatVector

    q = "model.layers.0.self_attn.q_proj.weight"
    base_t, chat_t = _state(MODELS["BASE"])[q].double(), _state(MODELS["CHAT"])[q].double()
    ctx = _context("relative_change")
    assert ex.check("relative_change", float((chat_t - base_t).norm() / base_t.norm()), **ctx)
    for answer, hint in [(float((chat_t - base_t).norm()), "‖Δ‖ alone"),
                         (float((chat_t - base_t).norm() / chat_t.norm()), "the chat model's norm"),
                         (float((chat_t.norm() - base_t.norm()) / base_t.norm()), "change of the norm")]:
        assert not ex.check("relative_change", answer, **ctx) and hint in capsys.readouterr().out

    name = "model.layers.1.mlp.down_proj.weight"
    s = torch.linalg.svdvals(ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"])[name].double())
    ctx = _context("effective_rank")
    for answer, hint in [(float((s**2).sum() / s[0] ** 2), "stable rank"),
                         (math.exp(float(-((s**2 / (s**2).sum()) * (s**2 / (s**2).sum()).log()).sum())), "σ²"),
                         (float(len(s)), "shorter side")]:
        assert not ex.check("effective_rank", answer, **ctx) and hint in capsys.readouterr().out, hint

    up = "model.layers.2.mlp.up_proj.weight"
    a, b = _state(MODELS["CHAT"])[up].double().flatten(), _state(MODELS["CHAT_ALT"])[up].double().flatten()
    assert not ex.check("cosine_one_tensor", float(a @ b / (a.norm() * b.norm())), **_context("cosine_one_tensor"))
    assert "cosine of the weights" in capsys.readouterr().out
    assert not ex.check("cosine_one_tensor", 1.5, **_context("cosine_one_tensor"))
    assert "between −1 and 1" in capsys.readouterr().out


def test_layer_cosine_wants_pooled_coordinates(capsys):
    from chatvec_lab import ChatVector
    from chatvec_lab.naming import parse

    chat, lang = ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"]), ChatVector.from_models(MODELS["BASE"], MODELS["CP"])
    per_tensor = [float(torch.nn.functional.cosine_similarity(chat[n].double().flatten(), lang[n].double().flatten(), dim=0))
                  for n in chat.names if parse(n).layer == 1]
    assert not ex.check("layer_cosine", sum(per_tensor) / len(per_tensor), **_context("layer_cosine"))
    assert "pool the coordinates" in capsys.readouterr().out


def test_answer_shapes_are_explained(capsys):
    ctx = _context("turn_end_half")
    for answer, hint in [(0.5, "answer with a dict"), ({"prediction": 0.5, "measured": 3}, "between 0 and 1"),
                         ({"prediction": "half", "measured": 0.0}, "should be a number")]:
        result = ex.check("turn_end_half", answer, **ctx)
        assert result.ok is False and hint in capsys.readouterr().out, hint
    assert not ex.check("cosine_driver", "the middle", **_context("cosine_driver"))
    assert "is not a part" in capsys.readouterr().out


def test_api_errors():
    with pytest.raises(KeyError, match="no exercise"):
        ex.check("no_such_exercise", 1.0)
    with pytest.raises(TypeError, match="takes"):
        ex.check("relative_change", None, model="x")
    with pytest.raises(KeyError):
        ex.solution("no_such_exercise")


def test_show_hint_progress_and_table(capsys):
    ex.show("turn_end_half")
    ex.hint("turn_end_half")
    ex.progress()
    out = capsys.readouterr().out
    assert "01_quickstart" in out and "hint 1:" in out and "max_new_tokens=32" in out
    assert all(n in out for n in ex.names())
    table = ex.table()
    assert list(table["exercise"]) == ex.names() and set(table["notebook"]) >= {"01_quickstart", "06_ablations"}
    assert repr(ex.Result("x", True, "m")) == "Result('x', ok=True)"
