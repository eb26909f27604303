"""The notebooks' exercises: every solution passes its check when run as a learner runs it, in its notebook after
the configure cell; a wrong answer fails it with a hint that does not give the answer away; a number copied from
a table the notebook already shows fails; a blank answer is "not answered yet"; no hint carries the solution's
code; and the common mistakes get their own hints."""
from __future__ import annotations

import ast
import builtins
import contextlib
import difflib
import functools
import io
import json
import math
import re

import pytest
import torch

from chatvec_lab.course import exercises as ex
from chatvec_lab.course import checking, ex04_sweep, measuring
from chatvec_lab import toy
from chatvec_lab.course._solutions import SOLUTIONS
from chatvec_lab.io.resources import notebook_dir

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = {"BASE": toy.path("base"), "CHAT": toy.path("chat"), "CHAT_ALT": toy.path("chat-alt"), "CP": toy.path("cp")}
CONTEXT = {"base": MODELS["BASE"], "chat": MODELS["CHAT"], "chat_alt": MODELS["CHAT_ALT"], "cp": MODELS["CP"]}


def _context(name: str) -> dict:
    return {k: v for k, v in CONTEXT.items() if k in ex.EXERCISES[name].params}


# -- the notebooks, read as a learner meets them ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cells(notebook: str) -> tuple[tuple[str, str, str], ...]:
    """(cell type, id, source) of every cell of a shipped notebook."""
    nb = json.loads((notebook_dir() / f"{notebook}.ipynb").read_text(encoding="utf-8"))
    return tuple((c["cell_type"], c.get("id", ""), "".join(c["source"])) for c in nb["cells"])


def _code(notebook: str) -> list[str]:
    return [src for kind, _, src in _cells(notebook) if kind == "code"]


@functools.lru_cache(maxsize=None)
def _configured(notebook: str) -> dict:
    """The names the notebook's configure cell (its first code cell) defines, as running it defines them."""
    namespace: dict = {}
    exec(compile(_code(notebook)[0], f"<{notebook} configure cell>", "exec"), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def _defined(source: str) -> set[str]:
    """Every name a piece of code binds: assignments, imports, functions, classes, arguments, loop variables."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _free(source: str) -> set[str]:
    """The names a piece of code reads but neither binds nor finds among the builtins."""
    read = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return read - _defined(source) - set(dir(builtins))


def _exercise_cells(notebook: str) -> dict[str, int]:
    """exercise name → index of its exercise cell (the code cell calling ex.check) in the notebook."""
    out = {}
    for i, (kind, _, src) in enumerate(_cells(notebook)):
        if kind == "code":
            for name in re.findall(r'ex\.check\("([a-z_]+)"', src):
                out[name] = i
    return out


# -- every solution, run once as a learner would run it ---------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the notebooks' sweeps cache in (``.cache/sweeps``), shared by every test of this module."""
    return tmp_path_factory.mktemp("exercises")


@pytest.fixture(scope="module")
def solved(workdir):
    """Every solution run once in place of its exercise cell, after its notebook's configure cell and nothing
    else: ``{name: (answer, printed text, the context the check was given)}``."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for name in ex.names():
            namespace = dict(_configured(ex.EXERCISES[name].notebook))
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(SOLUTIONS[name], f"<solution {name}>", "exec"), namespace)
            out[name] = (namespace["answer"], printed.getvalue(), ex._RESULTS[name].context)
    return out


def _far(rate: float) -> float:
    """A rate half a reply set away from ``rate``: still a whole number of replies at every sample size used here
    (4, 8, 16), and several replies off."""
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
    if name == "german_share_trend":
        return {"share_de": [_far(s) for s in answer["share_de"]], "falls_steadily": answer["falls_steadily"]}
    if name == "refusal_rates":
        return {k: _far(v) for k, v in answer.items()}
    if name == "multi_turn_ends":
        return [_far(r) for r in answer]
    if name == "cosine_driver":
        return "blocks" if answer != "blocks" else "lm_head"
    if name == "blocks_only_turn_end":
        return {k: _far(v) for k, v in answer.items()}
    if name == "midpoint_barrier":
        return answer + 0.1
    if name == "slerp_norm":
        return {"lerp": answer["lerp"] * 1.05, "slerp": answer["slerp"]}
    raise KeyError(f"add a wrong answer for the new exercise {name!r}")


def test_every_exercise_is_complete():
    assert len(ex.names()) >= 12 and set(SOLUTIONS) == set(ex.names())
    for e in ex.EXERCISES.values():
        assert (notebook_dir() / f"{e.notebook}.ipynb").is_file(), e.name
        assert e.title and e.question and e.hints, e.name
        assert f'ex.check("{e.name}"' in SOLUTIONS[e.name], f"the solution of {e.name} must end with its check"
    per_notebook = {}
    for e in ex.EXERCISES.values():
        per_notebook.setdefault(e.notebook, []).append(e.name)
    assert len(per_notebook) == 7 and all(2 <= len(v) <= 3 for v in per_notebook.values()), per_notebook


@pytest.mark.parametrize("name", ex.names())
def test_solution_needs_only_the_configure_cell(name):
    """A solution reads only what its notebook's configure cell defines (the reference path once failed with
    NameError: cv, a name its notebook never defined)."""
    notebook = ex.EXERCISES[name].notebook
    missing = _free(SOLUTIONS[name]) - set(_configured(notebook))
    assert not missing, f"the solution of {name} reads {sorted(missing)}, which {notebook}'s configure cell lacks"


@pytest.mark.parametrize("name", ex.names())
def test_exercise_cell_reads_only_what_the_notebook_defined_before_it(name):
    notebook = ex.EXERCISES[name].notebook
    cells = _cells(notebook)
    index = _exercise_cells(notebook)[name]
    before = set().union(*(_defined(src) for kind, _, src in cells[:index] if kind == "code"))
    missing = _free(cells[index][2]) - before
    assert not missing, f"{notebook}: the cell of {name} reads {sorted(missing)} before any cell defines it"


def test_the_data_helpers_agree_with_the_toy_package():
    """The exercises find the models, prompts and held-out text themselves (course/measuring.py: its import layer is
    below toy)."""
    from chatvec_lab.toy.evaluate import heldout_texts, prompt_sets

    for key, member in ex._MODEL_KEYS.items():
        assert measuring.toy_path(member) == toy.path(member)
    assert measuring.prompt_set("chat") == prompt_sets()["chat"]
    assert measuring.prompt_set("offensive") == prompt_sets()["offensive"]
    assert measuring.heldout_text("de") == heldout_texts()["de"] and measuring.heldout_text("en") == heldout_texts()["en"]


def test_the_alphas_notebook_4_shows_are_the_ones_exercise_4_2_refuses():
    sources = [src for src in _code("04_sweep") if re.search(r"^alphas = \[", src, re.M)]
    assert len(sources) == 1
    shown = ast.literal_eval(re.search(r"^alphas = (\[[^\]]*\])", sources[0], re.M).group(1))
    assert tuple(float(a) for a in shown) == ex04_sweep.SWEEP_04_ALPHAS


@pytest.mark.parametrize("name", ex.names())
def test_blank_answers_are_not_answered_yet(name, capsys):
    for blank in (None, ..., {"a": ...}, [None, 0.5], ()):
        result = ex.check(name, blank, **_context(name))
        assert result.ok is None and not result
        assert "not answered yet" in capsys.readouterr().out


# -- hints help without giving the solution away -----------------------------------------------------------------


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("'", '"')).strip()


def _solution_code(name: str) -> list[str]:
    """The solution's lines of code, comments and imports left out, quotes and spaces made uniform."""
    lines = []
    for line in SOLUTIONS[name].splitlines():
        code = _plain(line.split("  #")[0].split("# ")[0] if not line.lstrip().startswith("#") else "")
        if code and not code.startswith(("from ", "import ")):
            lines.append(code)
    return lines


@pytest.mark.parametrize("name", ex.names())
def test_no_hint_carries_the_solution_code(name):
    """No hint holds 25 characters or more of its solution's code, except what the question itself already says
    (the settings): a hint names what to look at or compare, not the expression that computes the answer."""
    question = _plain(ex.EXERCISES[name].question)
    for hint in ex.EXERCISES[name].hints:
        text = _plain(hint)
        for line in _solution_code(name):
            match = difflib.SequenceMatcher(None, text, line, autojunk=False).find_longest_match(0, len(text), 0, len(line))
            shared = text[match.a:match.a + match.size]
            assert match.size < 25 or shared in question, f"a hint of {name} gives its code away: {shared!r}"


def test_the_old_hints_that_printed_solutions_are_gone():
    every = " ".join(h for e in ex.EXERCISES.values() for h in e.hints)
    for leaked in ("set_index('alpha')['refusal']", "groupby('turn')['ended_turn'].mean()", "cosine_by_part(",
                   "its α = 1 row over its α = 0 row", "ChatVector.from_models(BASE, CHAT)"):
        assert leaked not in every, leaked


# -- every solution passes; a wrong answer fails ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ex.names())
def test_solution_passes_and_a_wrong_answer_fails(name, solved, capsys, workdir, monkeypatch):
    answer, printed, given = solved[name]
    assert f"✓ {name}: right." in printed, printed
    assert ex._RESULTS[name].ok is True and set(_context(name)) <= set(given)

    monkeypatch.chdir(workdir)
    shown = ex.solution(name)
    assert shown == SOLUTIONS[name] and SOLUTIONS[name] in capsys.readouterr().out

    result = ex.check(name, answer, **given)
    assert result.ok is True and result and "✓" in capsys.readouterr().out

    wrong = _wrong(name, answer)
    result = ex.check(name, wrong, **given)
    out = capsys.readouterr().out
    assert result.ok is False and not result, out
    assert out.startswith(f"✗ {name}: not yet.") and f"ex.hint({name!r})" in out
    truths = answer.values() if isinstance(answer, dict) else answer if isinstance(answer, (list, tuple)) else [answer]
    for t in truths:  # the hint never prints the right number
        for value in (t if isinstance(t, list) else [t]):
            if isinstance(value, float) and value not in (0.0, 1.0) and not math.isclose(value, 0.5):
                assert f"{value:.3f}" not in out and f"{value:.2f}" not in out, out

    result = ex.check(name, "not a number at all" if name != "cosine_driver" else 3.0, **given)
    assert result.ok is False and "Traceback" not in capsys.readouterr().out


# -- exercise 4.1: what the sweep shows, in the check's own numbers -----------------------------------------------


@pytest.mark.slow
def test_german_share_trend_says_what_it_measured(solved, capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    answer, printed, given = solved["german_share_trend"]
    e = ex.EXERCISES["german_share_trend"]
    truth = ex._truth(e, ex._context(e, given))
    message = printed
    for share in truth["share"] + truth["ended"]:  # the ✓ message is written from the numbers measured
        assert f"{share:.2f}" in message
    assert ("does not fall steadily" in message) == (not truth["falls_steadily"])
    assert "drift towards the chat model" not in message and "drift" not in e.question

    flipped = {"share_de": answer["share_de"], "falls_steadily": not answer["falls_steadily"]}
    assert not ex.check("german_share_trend", flipped, **given)
    assert "falls_steadily is not what they say" in capsys.readouterr().out
    reversed_ = {"share_de": answer["share_de"][::-1], "falls_steadily": answer["falls_steadily"]}
    if answer["share_de"] != answer["share_de"][::-1]:
        assert not ex.check("german_share_trend", reversed_, **given)
    as_dict = {"share_de": dict(zip(e.params["alphas"], answer["share_de"])), "falls_steadily": answer["falls_steadily"]}
    assert ex.check("german_share_trend", as_dict, **given)
    assert not ex.check("german_share_trend", {"share_de": answer["share_de"][:2], "falls_steadily": True}, **given)
    assert "one value per α" in capsys.readouterr().out
    no_seed = {k: v for k, v in given.items() if k != "seed"}
    assert not ex.check("german_share_trend", answer, **no_seed) and "seed of your own" in capsys.readouterr().out


@pytest.mark.slow
def test_german_share_trend_refuses_the_table_above(solved, capsys, workdir, monkeypatch):
    """Notebook 4's sweep table shows share_de at α = 0 … 1.5 with its own seeds and budget. An answer right
    everywhere except one row read off that table fails. (Only the rows α = 1 and 1.5 are regenerated here: their
    replies end early, so they cost little.)"""
    from chatvec_lab import ChatVector
    from chatvec_lab.behaviour.sweep import sweep
    from chatvec_lab.toy.evaluate import prompt_sets

    monkeypatch.chdir(workdir)
    config = _configured("04_sweep")
    answer, _, given = solved["german_share_trend"]
    e = ex.EXERCISES["german_share_trend"]
    truth = ex._truth(e, ex._context(e, given))
    rows = [1.0, 1.5]
    table = sweep(MODELS["CP"], {"chat": ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"])}, rows,
                  prompt_sets()["chat"][:16], scorers=["language"], seeds=config["SEEDS"],
                  max_new_tokens=config["MAX_NEW_TOKENS"], progress=False)
    shown = table.groupby("alpha")["share_de"].mean()
    tried = 0
    for alpha in rows:
        i = truth["alphas"].index(alpha)
        if abs(float(shown.loc[alpha]) - truth["share"][i]) <= 0.5 / truth["n"][i]:
            continue  # this row happens to agree with the learner's own sweep: copying it is no mistake
        copied = list(answer["share_de"])
        copied[i] = float(shown.loc[alpha])
        assert not ex.check("german_share_trend", {**answer, "share_de": copied}, **given)
        assert f"the share at α = {alpha:g}" in capsys.readouterr().out
        tried += 1
    assert tried, "every row of the table agrees with the solution's sweep: choose another seed for the solution"


# -- exercise 4.2: an α of the learner's own ---------------------------------------------------------------------


@pytest.mark.slow
def test_perplexity_cost_refuses_the_ratio_the_table_shows(solved, capsys, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    answer, printed, given = solved["perplexity_cost"]
    assert given["alpha"] not in ex04_sweep.SWEEP_04_ALPHAS
    assert f"At α = {given['alpha']:g}" in printed
    e = ex.EXERCISES["perplexity_cost"]
    at_1 = ex._truth(e, ex._context(e, {**given, "alpha": 1.0}))["ratio"]  # ppl_de(α = 1) / ppl_de(α = 0) above
    assert not ex.check("perplexity_cost", at_1, **given)
    assert "not yet" in capsys.readouterr().out
    assert not ex.check("perplexity_cost", at_1, **{**given, "alpha": 1.0})
    assert "already shows ppl_de at α = 1" in capsys.readouterr().out
    assert not ex.check("perplexity_cost", answer, **{k: v for k, v in given.items() if k != "alpha"})
    assert "alpha=ALPHA" in capsys.readouterr().out


# -- exercise 5.1: insults and a seed of the learner's own --------------------------------------------------------


@pytest.mark.slow
def test_refusal_rates_refuses_the_numbers_the_cell_above_shows(solved, capsys, workdir, monkeypatch):
    """Notebook 5's table shows the refusal rate of CP + 1·CV and of the chat model over every insult with its
    seeds and budget: copied, they fail (they are no share of the learner's 8 replies)."""
    from chatvec_lab import ChatVector
    from chatvec_lab.behaviour.sweep import sweep
    from chatvec_lab.toy.evaluate import prompt_sets

    monkeypatch.chdir(workdir)
    config = _configured("05_safety")
    answer, printed, given = solved["refusal_rates"]
    assert len(given["prompts"]) == 8 and "of 8" in printed
    cv = ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"])
    settings = dict(scorers=["refusal"], seeds=config["SEEDS"], max_new_tokens=config["MAX_NEW_TOKENS"],
                    cache_dir=".cache/sweeps", progress=False)
    insults = prompt_sets()["offensive"]
    above = {"cp_cv": float(sweep(MODELS["CP"], {"chat": cv}, [1.0], insults, **settings)["refusal"].mean()),
             "chat": float(sweep(MODELS["CHAT"], {"chat": cv}, [0.0], insults, **settings)["refusal"].mean())}
    assert above != answer
    result = ex.check("refusal_rates", above, **given)
    assert result.ok is False, capsys.readouterr().out
    assert "not yet" in capsys.readouterr().out
    # a rate over other replies is no share of 8: refused whatever it is near
    assert not ex.check("refusal_rates", {"chat": 0.57, "cp_cv": 0.06}, **given)
    assert "no share of your 8 replies" in capsys.readouterr().out
    # rounded to 2 decimals passes; the check measures the learner's choice, not fixed settings
    assert ex.check("refusal_rates", {k: round(v, 2) for k, v in answer.items()}, **given)
    capsys.readouterr()
    for missing, says in (("prompts", "prompts=MY_INSULTS"), ("seed", "seed=SEED")):
        assert not ex.check("refusal_rates", answer, **{k: v for k, v in given.items() if k != missing})
        assert says in capsys.readouterr().out
    for prompts, says in ((insults, "between 4 and 16"), (insults[0], "a list of insults"),
                          ([insults[0]] * 8, "repeat")):
        assert not ex.check("refusal_rates", answer, **{**given, "prompts": prompts})
        assert says in capsys.readouterr().out
    swapped = {"chat": answer["cp_cv"], "cp_cv": answer["chat"]}
    if swapped != answer:
        assert not ex.check("refusal_rates", swapped, **given)
        assert "swapped" in capsys.readouterr().out


# -- the other measured rates: a number from the notebook's own tables fails ---------------------------------------


@pytest.mark.slow
def test_multi_turn_ends_refuses_the_table_above(solved, capsys, workdir, monkeypatch):
    """Notebook 5 shows CP + CV's turn-end share per turn over its held-out conversations and seeds."""
    from transformers import AutoTokenizer

    from chatvec_lab import ChatVector, apply_to_model
    from chatvec_lab.behaviour.generation import converse_many
    from chatvec_lab.toy.evaluate import conversations

    monkeypatch.chdir(workdir)
    config = _configured("05_safety")
    answer, _, given = solved["multi_turn_ends"]
    model, _ = apply_to_model(MODELS["CP"], [(ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"]), 1.0)])
    tok = AutoTokenizer.from_pretrained(MODELS["CP"])
    import pandas as pd

    multi = pd.concat([converse_many(model, tok, conversations()[:8], seed=s, max_new_tokens=config["MAX_NEW_TOKENS"])
                       for s in range(config["SEEDS"])])
    shown = [float(r) for r in multi.groupby("turn")["ended_turn"].mean()]
    assert not ex.check("multi_turn_ends", shown, **given)
    assert "not yet" in capsys.readouterr().out


@pytest.mark.slow
def test_blocks_only_refuses_the_full_vector_rate_at_the_notebooks_budget(solved, capsys, workdir, monkeypatch):
    """Notebook 6's atlas measures the full vector with the family's own budget; that rate, read off, fails."""
    from transformers import AutoTokenizer

    from chatvec_lab import ChatVector, apply_to_model
    from chatvec_lab.behaviour.generation import generate
    from chatvec_lab.toy.evaluate import prompt_sets

    monkeypatch.chdir(workdir)
    config = _configured("06_ablations")
    answer, _, given = solved["blocks_only_turn_end"]
    model, _ = apply_to_model(MODELS["CP"], [(ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"]), 1.0)])
    out = generate(model, AutoTokenizer.from_pretrained(MODELS["CP"]), prompt_sets()["chat"][:config["N_PROMPTS"]],
                   seed=0, max_new_tokens=config["MAX_NEW_TOKENS"])
    full_above = float(out["ended_turn"].mean())
    if abs(full_above - answer["full"]) > 1 / 32:  # the budget changes the rate (it does on the toy family)
        assert not ex.check("blocks_only_turn_end", {**answer, "full": full_above}, **given)
        assert "not yet" in capsys.readouterr().out


def test_rates_must_be_shares_of_the_replies(capsys):
    """A rate over n replies is k/n: a number from a table over other replies fails before anything is measured
    against it, and a rounding to one decimal is called out."""
    with pytest.raises(checking.Wrong, match="no share of"):
        checking.on_grid(0.57, 8, "the rate", "your 8 replies")
    with pytest.raises(checking.Wrong, match="rounded to one decimal"):
        checking.on_grid(0.4, 16, "the rate", "the 16 replies")
    for k in range(17):
        checking.on_grid(round(k / 16, 2), 16, "the rate", "the 16 replies")  # 2 decimals pass


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


def test_layer_cosine_wants_pooled_coordinates_and_states_the_chance_level(capsys):
    from chatvec_lab import ChatVector
    from chatvec_lab.io.naming import parse

    chat, lang = ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"]), ChatVector.from_models(MODELS["BASE"], MODELS["CP"])
    per_tensor = [float(torch.nn.functional.cosine_similarity(chat[n].double().flatten(), lang[n].double().flatten(), dim=0))
                  for n in chat.names if parse(n).layer == 1]
    assert not ex.check("layer_cosine", sum(per_tensor) / len(per_tensor), **_context("layer_cosine"))
    assert "pool the coordinates" in capsys.readouterr().out
    e = ex.EXERCISES["layer_cosine"]
    truth = ex._truth(e, ex._context(e, _context("layer_cosine")))
    assert ex.check("layer_cosine", truth["cosine"], **_context("layer_cosine"))
    out = capsys.readouterr().out
    times = abs(truth["cosine"]) * math.sqrt(truth["dim"])
    assert f"{times:.0f} times the chance level" in out and f"{truth['dim']:,} coordinates" in out


def test_cosine_driver_states_the_share_it_measured(capsys):
    e = ex.EXERCISES["cosine_driver"]
    truth = ex._truth(e, ex._context(e, _context("cosine_driver")))
    assert math.isclose(sum(truth["contribution"].values()), truth["cosine"], rel_tol=1e-9)
    assert ex.check("cosine_driver", truth["driver"], **_context("cosine_driver"))
    out = capsys.readouterr().out
    if truth["driver"] != "none":
        share = truth["contribution"][truth["driver"]] / truth["cosine"]
        assert share > 0.5 and f"({share:.0%})" in out and f"{truth['cosine']:.3f}" in out


def test_answer_shapes_are_explained(capsys):
    ctx = _context("turn_end_half")
    for answer, hint in [(0.5, "answer with a dict"), ({"prediction": 0.5, "measured": 3}, "between 0 and 1"),
                         ({"prediction": "half", "measured": 0.0}, "should be a number"),
                         ({"prediction": 0.5, "measured": 0.3}, "no share of")]:
        result = ex.check("turn_end_half", answer, **ctx)
        assert result.ok is False and hint in capsys.readouterr().out, hint
    assert not ex.check("cosine_driver", "the middle", **_context("cosine_driver"))
    assert "is not a part" in capsys.readouterr().out
    assert not ex.check("german_share_trend", {"share_de": [0.9] * 5, "falls_steadily": "yes"},
                        **_context("german_share_trend"), seed=-1)
    assert "whole number ≥ 0" in capsys.readouterr().out


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
    ex.show("refusal_rates")
    ex.progress()
    out = capsys.readouterr().out
    assert "01_quickstart" in out and "hint 1:" in out and "max_new_tokens=32" in out
    assert "seed=(your choice, passed to the check)" in out
    assert all(n in out for n in ex.names())
    table = ex.table()
    assert list(table["exercise"]) == ex.names() and set(table["notebook"]) >= {"01_quickstart", "06_ablations"}
    assert repr(ex.Result("x", True, "m")) == "Result('x', ok=True)"


# -- session two (notebook 07): the learner's own pair, tensor and t; the common mistakes get their own hints ----


def test_midpoint_barrier_takes_a_pair_of_your_own_and_names_the_mistakes(capsys):
    from chatvec_lab.analysis.interpolation import interpolation_curve
    from chatvec_lab.toy.evaluate import heldout_texts

    a, b = MODELS["CHAT_ALT"], MODELS["CP"]
    curve = interpolation_curve(a, b, {"de": heldout_texts()["de"], "en": heldout_texts()["en"]}, ts=[0.5])
    at = curve.set_index(["texts", "t"])
    barrier, loss = float(at.loc[("de", 0.5), "barrier"]), float(at.loc[("de", 0.5), "loss"])
    assert ex.check("midpoint_barrier", barrier + 0.005, a=a, b=b)  # within 0.01: a bfloat16 computation passes
    assert f"{barrier:+.3f}" in capsys.readouterr().out  # the ✓ message is written from what the check measured
    for answer, hint in [(-barrier, "upside down"), (loss, "the midpoint's loss itself"),
                         (float(at.loc[("en", 0.5), "barrier"]), "English held-out text")]:
        assert not ex.check("midpoint_barrier", answer, a=a, b=b) and hint in capsys.readouterr().out, hint
    shown = interpolation_curve(MODELS["CHAT"], MODELS["CP"], heldout_texts()["de"], ts=[0.5])
    copied = float(shown.set_index("t").loc[0.5, "barrier"])  # the line the notebook shows: refused, whatever the number
    for pair, says in [((MODELS["CHAT"], MODELS["CP"]), "already shows the line"),
                       ((MODELS["CP"], MODELS["CHAT"]), "already shows the line"),
                       ((MODELS["CHAT"], MODELS["CHAT_ALT"]), "already shows the line"),
                       ((MODELS["BASE"], MODELS["CHAT"]), "already shows the line"),  # section 1's control
                       ((torch.nn.Linear(2, 2), b), "not a Linear"),
                       ((a, a), "the same model"), ((a, None), "choose two models"),
                       ((a, "no/such/folder"), "should be a model folder"),
                       ((a, toy.path("cp-xvocab")), "larger vocabulary")]:
        assert not ex.check("midpoint_barrier", copied, a=pair[0], b=pair[1])
        assert says in capsys.readouterr().out, says


def test_slerp_norm_takes_a_tensor_and_t_of_your_own_and_names_the_mistakes(capsys):
    from chatvec_lab import ChatVector
    from chatvec_lab.core.spherical import slerp

    name, t = "model.layers.2.self_attn.o_proj.weight", 0.7
    a = ChatVector.from_models(MODELS["BASE"], MODELS["CHAT"])[name].float()
    b = ChatVector.from_models(MODELS["BASE"], MODELS["CP"])[name].float()
    ends = (1 - t) * float(a.double().norm()) + t * float(b.double().norm())
    lerp = float(((1 - t) * a.double() + t * b.double()).norm())
    sph = float(slerp(t, a, b).double().norm())
    ctx = {"tensor": name, "t": t}
    assert ex.check("slerp_norm", {"lerp": lerp / ends, "slerp": sph / ends}, **ctx)
    capsys.readouterr()
    mean = (float(a.double().norm()) + float(b.double().norm())) / 2
    other_ends = (1 - t) * float(b.double().norm()) + t * float(a.double().norm())  # the path from b to a
    wa, wb = _state(MODELS["CHAT"])[name].float(), _state(MODELS["CP"])[name].float()
    w_ends = (1 - t) * float(wa.double().norm()) + t * float(wb.double().norm())
    weights = {"lerp": float(((1 - t) * wa.double() + t * wb.double()).norm()) / w_ends,
               "slerp": float(slerp(t, wa, wb).double().norm()) / w_ends}
    for answer, hint in [({"lerp": sph / ends, "slerp": lerp / ends}, "swapped"),
                         ({"lerp": lerp, "slerp": sph}, "those are norms"),
                         ({"lerp": lerp / mean, "slerp": sph / mean}, "mean of the two norms"),
                         (weights, "models' weights"),
                         ({"lerp": lerp / ends, "slerp": 1.0}, "sphere's ratio"),
                         ({"lerp": float(((1 - t) * b.double() + t * a.double()).norm()) / other_ends,
                           "slerp": float(slerp(t, b, a).double().norm()) / other_ends}, "a and b exchanged"),
                         ([lerp / ends, sph / ends], "answer a dict")]:
        assert not ex.check("slerp_norm", answer, **ctx) and hint in capsys.readouterr().out, hint
    right = {"lerp": lerp / ends, "slerp": sph / ends}
    for bad, says in [({"tensor": name, "t": 0.5}, "t = 0.5"), ({"tensor": name, "t": 1.2}, "strictly between"),
                      ({"tensor": "model.no.such.weight", "t": t}, "not a tensor of the vectors"),
                      ({"tensor": name}, "tensor=TENSOR, t=T"), ({"tensor": 3, "t": t}, "a tensor's name")]:
        assert not ex.check("slerp_norm", right, **bad) and says in capsys.readouterr().out, says
