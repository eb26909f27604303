"""The exercises of notebook 03_sources: the cosine of the chat and chat-alt vectors in one tensor, and of the chat
and language vectors over one layer's tensors (each a ``truth`` and a ``judge``: ``chatvec_lab.course.checking``)."""
from __future__ import annotations

import math

from chatvec_lab.course.checking import Exercise, Wrong, as_number, close
from chatvec_lab.course.measuring import cosine_of, raw_tensor, vector_of

EXERCISES: list[Exercise] = []  # in the notebook's order


def _cosine_one_tensor_truth(base, chat, chat_alt, tensor):
    return {"cosine": cosine_of(vector_of(base, chat)[tensor], vector_of(base, chat_alt)[tensor]),
            "weights": cosine_of(raw_tensor(chat, tensor), raw_tensor(chat_alt, tensor))}


def _cosine_one_tensor_judge(answer, truth, ctx):
    v = as_number(answer)
    if close(v, truth["cosine"], 0, 1e-4):
        return ("Compare it with the global cosine and the blocks' cosine in the table above: one tensor is a "
                "small sample.")
    if close(v, truth["weights"], 0, 1e-4):
        raise Wrong("that is the cosine of the weights θ_chat and θ_chat-alt: nearly 1, because both start from "
                    "the same base. Take the two deltas (each model minus the base).")
    if not -1 <= v <= 1:
        raise Wrong("a cosine lies between −1 and 1: a·b / (‖a‖ ‖b‖).")
    raise Wrong(f"not the cosine of (θ_chat − θ_base) and (θ_chat-alt − θ_base) for {ctx['tensor']}.")


EXERCISES.append(Exercise(
    name="cosine_one_tensor",
    notebook="03_sources",
    title="the cosine between the chat and chat-alt vectors in one tensor",
    question=(
        "Compute the cosine similarity between the `chat` vector and the `chat-alt` vector in the single tensor "
        "`model.layers.2.mlp.up_proj.weight`: flatten both deltas and take a·b / (‖a‖ ‖b‖). Your answer is one "
        "number."),
    params={"base": None, "chat": None, "chat_alt": None, "tensor": "model.layers.2.mlp.up_proj.weight"},
    truth=_cosine_one_tensor_truth,
    judge=_cosine_one_tensor_judge,
    hints=("Each vector is a model minus the same base: take the deltas of chat and of chat-alt, not their weights.",
           "Flatten before the dot product; compute in float64 (.double()) to be safe.")))


def _layer_cosine_truth(base, chat, cp, layer):
    from chatvec_lab.io.naming import parse

    a_vec, b_vec = vector_of(base, chat), vector_of(base, cp)
    dot = na = nb = 0.0
    dim = 0
    per_tensor, whole = [], [0.0, 0.0, 0.0]
    for name in a_vec.names:
        a, b = a_vec[name].double(), b_vec[name].double()
        d, x, y = float((a * b).sum()), float((a * a).sum()), float((b * b).sum())
        whole = [whole[0] + d, whole[1] + x, whole[2] + y]
        if parse(name).layer == layer:
            dot, na, nb, dim = dot + d, na + x, nb + y, dim + a.numel()
            per_tensor.append(d / math.sqrt(x * y) if x > 0 and y > 0 else 0.0)
    if not per_tensor:
        raise ValueError(f"no tensor of layer {layer}")
    return {"cosine": dot / math.sqrt(na * nb), "mean": sum(per_tensor) / len(per_tensor),
            "global": whole[0] / math.sqrt(whole[1] * whole[2]), "dim": dim}


def _layer_cosine_judge(answer, truth, ctx):
    v = as_number(answer)
    if close(v, truth["cosine"], 0, 1e-4):
        cos, d = truth["cosine"], truth["dim"]
        chance = 1 / math.sqrt(d)
        times = abs(cos) / chance
        verdict = ("within a few chance levels of 0" if times < 3 else "beyond chance" if times < 10
                   else "far beyond chance")
        return (f"{cos:.3f} over the {d:,} coordinates of layer {ctx['layer']}: {times:.0f} times the chance level "
                f"of two random directions in that many dimensions (1/√d = {chance:.1e}), {verdict}.")
    if close(v, truth["mean"], 0, 1e-4):
        raise Wrong("that is the mean of per-tensor cosines; pool the coordinates instead: sum the dot products "
                    "and the squared norms over the layer's tensors, then divide once.")
    if close(v, truth["global"], 0, 1e-4):
        raise Wrong(f"that is over the whole vector; keep only the tensors of layer {ctx['layer']}.")
    raise Wrong(f"not the cosine of the chat vector and the language vector (θ_cp − θ_base) over the tensors "
                f"of layer {ctx['layer']}.")


EXERCISES.append(Exercise(
    name="layer_cosine",
    notebook="03_sources",
    title="the cosine between the chat vector and the language vector inside layer 1",
    question=(
        "Compute the cosine between the chat vector (`θ_chat − θ_base`) and the language vector "
        "(`θ_cp − θ_base`) over **all tensors of layer 1** together (`chatvec_lab.io.naming.parse(name).layer == "
        "1`), as if the layer's tensors were one long vector. Your answer is one number."),
    params={"base": None, "chat": None, "cp": None, "layer": 1},
    truth=_layer_cosine_truth,
    judge=_layer_cosine_judge,
    hints=("One long vector: accumulate the dot product and both squared norms over the layer's tensors, and divide "
           "only at the end. A mean of per-tensor cosines is another number.",
           "parse(name).layer is None for the embeddings, the final norm and the lm_head.")))
