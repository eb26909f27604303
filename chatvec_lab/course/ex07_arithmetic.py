"""The exercises of notebook 07_arithmetic: the loss barrier halfway between two models of the learner's choosing,
and what the line and the sphere do to the norm of one tensor of the chat and language vectors, at a t of the
learner's own (each a ``truth`` and a ``judge``: ``chatvec_lab.course.checking``).

Both take the learner's choices (a pair of models; a tensor and a t), passed to the check, which measures with
them: a number read off the notebook's tables fails.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from chatvec_lab.course.checking import Exercise, Wrong, as_number, close
from chatvec_lab.course.measuring import heldout_text, toy_path, vector_of
from chatvec_lab.errors import ChatVecError

EXERCISES: list[Exercise] = []  # in the notebook's order

# the lines notebook 07 measures (its `curves`, and chat ↔ base in section 1's control): their midpoints are on
# screen there
SHOWN_PAIRS = ({"chat", "cp"}, {"chat", "chat-alt"}, {"chat", "base"})
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: a real model named by its hub id (loaded by the check)
# the t at which notebook 07 shows the norms of the line and the sphere
SHOWN_T = 0.5


def _member(path) -> str | None:
    """The toy member a folder is, if it is one of the default family's."""
    for member in ("base", "chat", "chat-alt", "cp", "cp-xvocab"):
        try:
            if Path(path).resolve() == toy_path(member).resolve():
                return member
        except (FileNotFoundError, OSError, TypeError):
            continue
    return None


def _shown(value) -> str:
    """A value for a hint: a str or a number as it is, anything else (a model, a tensor) by its type."""
    return repr(value) if isinstance(value, (str, Path, int, float)) else f"a {type(value).__name__}"


def _pair_of_your_own(ctx) -> None:
    a, b = ctx.get("a"), ctx.get("b")
    if a is None or a is Ellipsis or b is None or b is Ellipsis:
        raise Wrong("choose two models of your own and pass them to the check: a=A, b=B (e.g. a=CHAT_ALT, b=CP).")
    for name, spec in (("a", a), ("b", b)):
        folder = isinstance(spec, (str, Path)) and (Path(spec) / "config.json").is_file()
        hub_id = isinstance(spec, str) and not Path(spec).exists() and HUB_ID.fullmatch(spec)
        if not (folder or hub_id):
            raise Wrong(f"{name} should be a model folder (like CHAT_ALT or CP) or a hub id, not {_shown(spec)}.")
    if str(a) == str(b) or Path(a).resolve() == Path(b).resolve():
        raise Wrong("a and b are the same model: the line between a model and itself is a point.")
    pair = {_member(a), _member(b)}
    if pair in SHOWN_PAIRS:
        raise Wrong(f"the notebook above already shows the line {' ↔ '.join(sorted(pair))}: choose a pair it did not "
                    "measure, e.g. chat-alt ↔ CP or base ↔ CP.")
    if "cp-xvocab" in pair:
        raise Wrong("cp-xvocab has a larger vocabulary than the others: a line needs two models of one shape.")


def _barrier_truth(a, b, t, language):
    from chatvec_lab.analysis.interpolation import interpolation_curve

    other = "en" if language != "en" else "de"
    try:
        curve = interpolation_curve(a, b, {language: heldout_text(language), other: heldout_text(other)}, ts=[t])
    except (ChatVecError, OSError, ValueError) as e:  # two architectures, no weights, a hub id offline
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Wrong(f"the check cannot measure the line between these two models: {why}") from None
    at = curve.set_index(["texts", "t"])
    mid, ends = at.loc[(language, t)], (at.loc[(language, 0.0)], at.loc[(language, 1.0)])
    ppl_ends = [math.exp(e["loss"]) for e in ends]
    return {"barrier": float(mid["barrier"]), "lo": float(mid["barrier_lo"]), "hi": float(mid["barrier_hi"]),
            "loss": float(mid["loss"]), "ends": [float(e["loss"]) for e in ends],
            "ppl_gap": float(mid["ppl"]) - ((1 - t) * ppl_ends[0] + t * ppl_ends[1]),
            "other": float(at.loc[(other, t), "barrier"]), "other_language": other}


def _barrier_judge(answer, truth, ctx):
    v = as_number(answer, "the barrier")
    tol = max(0.01, 0.02 * abs(truth["barrier"]))
    if close(v, truth["barrier"], 0, tol):
        lo, hi = truth["lo"], truth["hi"]
        if lo > 0:
            reading = "above the chord: a barrier that these texts can show"
        elif hi < 0:
            reading = "below the chord: no barrier, the middle of the line does better than the chord predicts"
        else:
            reading = "not measurably different from the chord at this number of texts"
        names = [_member(ctx[k]) or Path(ctx[k]).name for k in ("a", "b")]
        language = {"de": "German", "en": "English"}.get(ctx["language"], ctx["language"])
        return (f"Halfway between {names[0]} and {names[1]} the {language} held-out loss is "
                f"{truth['loss']:.3f} nats per token (endpoints {truth['ends'][0]:.3f} and {truth['ends'][1]:.3f}): "
                f"{truth['barrier']:+.3f} nats, 95% interval {lo:+.3f} to {hi:+.3f} over the texts, {reading}. "
                "Compare with the permuted pair above.")
    if close(-v, truth["barrier"], 0, tol):
        raise Wrong("upside down: the midpoint's loss minus the mean of the endpoints' losses.")
    if close(v, truth["loss"], 0, tol):
        raise Wrong("that is the midpoint's loss itself; the barrier is how far it lies above the mean of the two "
                    "endpoints' losses.")
    if close(v, truth["ppl_gap"], 0.01):
        raise Wrong("that is a difference of perplexities; the barrier is measured in loss (nats per token: the "
                    "log of a perplexity).")
    if close(v, truth["other"], 0, tol):
        other = {"de": "German", "en": "English"}.get(truth["other_language"], truth["other_language"])
        raise Wrong(f"measured on the {other} held-out text: use heldout_texts()[{ctx['language']!r}].")
    raise Wrong(f"not loss(½θ_a + ½θ_b) − ½(loss(a) + loss(b)) on the {ctx['language']} held-out text for the pair "
                "you passed (each loss the mean cross-entropy per token over all the texts' tokens together, not a "
                "mean of per-text means).")


EXERCISES.append(Exercise(
    name="midpoint_barrier",
    notebook="07_arithmetic",
    title="the loss barrier halfway between two models of your choosing",
    question=(
        "Choose two members of the toy family that share the base and whose line the notebook did **not** "
        "measure (not chat ↔ CP, not chat ↔ chat-alt, not chat ↔ base, section 1's control): e.g. chat-alt ↔ CP "
        "or base ↔ CP. Build the model halfway "
        "between them, θ = ½·θ_a + ½·θ_b (tensor by tensor, in float32), and measure the **barrier** at the "
        "midpoint on the German held-out text (`heldout_texts()[\"de\"]`): the midpoint's mean cross-entropy "
        "per token minus the mean of the two endpoints' (each over all the texts' tokens; the log of "
        "`chatvec_lab.behaviour.scoring.perplexity`'s number). Answer the barrier in nats (accepted within "
        "0.01) and pass your pair to the check (`a=A, b=B`)."),
    params={"a": None, "b": None, "t": 0.5, "language": "de"},
    truth=_barrier_truth,
    judge=_barrier_judge,
    validate=_pair_of_your_own,
    hints=("A model's mean cross-entropy per token over some texts is the log of its perplexity on them.",
           "Average the two state dicts tensor by tensor, load the average into a third copy of one of the "
           "models (load_state_dict), and measure all three on the same German texts with the same tokenizer.",
           "A negative barrier is no mistake: the middle may do better than the straight chord predicts.")))


def _tensor_and_t(ctx) -> None:
    tensor, t = ctx.get("tensor"), ctx.get("t")
    if tensor is None or tensor is Ellipsis or t is None or t is Ellipsis:
        raise Wrong("choose a tensor and a t of your own and pass them to the check: tensor=TENSOR, t=T.")
    if not isinstance(tensor, str):
        raise Wrong(f"tensor should be a tensor's name (a str of cv.names), not {_shown(tensor)}.")
    v = as_number(t, "t")
    if not 0 < v < 1:
        raise Wrong(f"t = {v:g}: choose a t strictly between 0 and 1.")
    if close(v, SHOWN_T, 0, 1e-9):
        raise Wrong("the notebook above shows every tensor at t = 0.5: choose another t, e.g. 0.3.")


def _slerp_truth(base, chat, cp, tensor, t):
    from chatvec_lab.core.spherical import slerp
    from chatvec_lab.course.measuring import raw_tensor

    cv, lv = vector_of(base, chat), vector_of(base, cp)
    if tensor not in cv.names:
        raise Wrong(f"{tensor!r} is not a tensor of the vectors: choose one of cv.names, e.g. "
                    "'model.layers.1.mlp.up_proj.weight'.")
    t = float(t)

    def ratios(a, b):
        a, b = a.float(), b.float()
        ends = (1 - t) * float(a.double().norm()) + t * float(b.double().norm())
        lerp = float(((1 - t) * a.double() + t * b.double()).norm())
        sph = float(slerp(t, a, b).double().norm())
        mean = (float(a.double().norm()) + float(b.double().norm())) / 2
        return {"lerp": lerp / ends, "slerp": sph / ends, "lerp_raw": lerp, "slerp_raw": sph,
                "lerp_mean": lerp / mean, "slerp_mean": sph / mean,
                "cosine": float(a.double().flatten() @ b.double().flatten() / (a.double().norm() * b.double().norm()))}

    out = ratios(cv[tensor], lv[tensor])
    out["weights"] = ratios(raw_tensor(chat, tensor), raw_tensor(cp, tensor))
    out["b_to_a"] = ratios(lv[tensor], cv[tensor])  # the path walked the other way: a and b exchanged
    return out


def _slerp_judge(answer, truth, ctx):
    if not isinstance(answer, dict) or set(answer) != {"lerp", "slerp"}:
        raise Wrong('answer a dict: {"lerp": ratio, "slerp": ratio}.')
    lerp, sph = as_number(answer["lerp"], "the line's ratio"), as_number(answer["slerp"], "the sphere's ratio")
    ok = close(lerp, truth["lerp"], 1e-3) and close(sph, truth["slerp"], 1e-3)
    if ok:
        t = float(ctx["t"])
        return (f"At t = {t:g} the chat and language vectors' {ctx['tensor']} (cosine {truth['cosine']:.3f}) keep "
                f"{truth['lerp']:.3f} of the interpolated norm on the line and {truth['slerp']:.3f} on the sphere. "
                f"The two models' weights in the same tensor: {truth['weights']['lerp']:.4f} and "
                f"{truth['weights']['slerp']:.4f} (cosine {truth['weights']['cosine']:.4f}).")
    if close(lerp, truth["slerp"], 1e-3) and close(sph, truth["lerp"], 1e-3):
        raise Wrong("the two ratios are swapped.")
    other_way = truth["b_to_a"]
    if close(lerp, other_way["lerp"], 1e-3) and close(sph, other_way["slerp"], 1e-3):
        raise Wrong("a and b exchanged: at t = 0 the point is a, the chat vector's tensor; at t = 1, b, the "
                    "language vector's.")
    if close(lerp, truth["lerp_raw"], 1e-3) or close(sph, truth["slerp_raw"], 1e-3):
        raise Wrong("those are norms; divide each by the interpolated norm of the endpoints, (1 − t)·‖a‖ + t·‖b‖.")
    if close(lerp, truth["lerp_mean"], 1e-3) or close(sph, truth["slerp_mean"], 1e-3):
        raise Wrong("divided by the mean of the two norms; at your t the endpoints' norm is (1 − t)·‖a‖ + t·‖b‖.")
    w = truth["weights"]
    if close(lerp, w["lerp"], 1e-4) and close(sph, w["slerp"], 1e-4):
        raise Wrong("measured on the models' weights; the question asks for the vectors (each model minus the base).")
    which = "line's" if not close(lerp, truth["lerp"], 1e-3) else "sphere's"
    raise Wrong(f"the {which} ratio is not what the check measures for {ctx['tensor']} at t = {float(ctx['t']):g} "
                "(a = the chat vector's tensor, b = the language vector's).")


EXERCISES.append(Exercise(
    name="slerp_norm",
    notebook="07_arithmetic",
    title="the norm of one tensor on the line and on the sphere, at a t of your own",
    question=(
        "Choose one tensor of the vectors (`TENSOR`, a name of `cv.names`) and a t of your own strictly between 0 "
        "and 1, other than 0.5. With a = the chat vector's tensor and b = the language vector's (each model minus "
        "the base), compute the norm of the line's point (1 − t)·a + t·b and of the sphere's point "
        "`slerp(t, a, b)` (`chatvec_lab.core.spherical.slerp`, mergekit's), each divided by the interpolated "
        "norm of the endpoints, (1 − t)·‖a‖ + t·‖b‖. Answer `{\"lerp\": ratio, \"slerp\": ratio}` (accepted "
        "within 0.1%) and pass your choices to the check (`tensor=TENSOR, t=T`)."),
    params={"base": None, "chat": None, "cp": None, "tensor": None, "t": None},
    truth=_slerp_truth,
    judge=_slerp_judge,
    validate=_tensor_and_t,
    hints=("The vectors are deltas from the base: the chat model's tensor minus the base's, and CP's minus the "
           "base's.",
           "Norms of flattened tensors (Frobenius), in float64 to be safe; slerp takes float32 tensors.",
           "Two nearly orthogonal tensors lose norm on the line between them; compare how much the sphere keeps.")))
