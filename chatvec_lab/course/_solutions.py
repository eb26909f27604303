"""One solution to each exercise in ``chatvec_lab.course.exercises``: shown only by ``exercises.solution(name)``.

Each is the whole exercise cell, filled in. It reads only the names its notebook's configure cell (the first
code cell) defines (``BASE``, ``CHAT``, ``CHAT_ALT``, ``CP``, and ``DEVICE`` / ``DTYPE`` where models run), imports
everything else itself, leaves the names the notebook's other cells define (``df``, ``model``, ``prompts``, ...) alone, and ends with the same ``ex.check(...)``
call as the notebook. ``tests/test_exercises.py`` runs every one of them after that configure cell, as a learner
would in notebook order, and requires the check to pass.
"""

SOLUTIONS = {
    "language_vector_by_hand": '''\
from pathlib import Path
from safetensors.torch import load_file
from chatvec_lab.course import exercises as ex

NAME = "model.layers.0.mlp.up_proj.weight"
base_sd = load_file(Path(BASE) / "model.safetensors")
cp_sd = load_file(Path(CP) / "model.safetensors")
answer = cp_sd[NAME].float() - base_sd[NAME].float()   # to float32 first, then subtract
ex.check("language_vector_by_hand", answer, base=BASE, cp=CP, chat=CHAT, tensor=NAME)
''',

    "turn_end_half": '''\
from transformers import AutoTokenizer
from chatvec_lab import ChatVector, apply_to_model
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.generation import generate
from chatvec_lab.toy.evaluate import prompt_sets

prediction = 0.5   # written down before measuring (any number between 0 and 1 is a prediction)
cv = ChatVector.from_models(BASE, CHAT)
half, _ = apply_to_model(CP, [(cv, 0.5)], device=DEVICE, dtype=DTYPE)
out = generate(half, AutoTokenizer.from_pretrained(CP), prompt_sets()["chat"][:16], seed=0, max_new_tokens=32)
answer = {"prediction": prediction, "measured": float(out["ended_turn"].mean())}
ex.check("turn_end_half", answer, base=BASE, chat=CHAT, cp=CP, device=DEVICE, dtype=DTYPE)
''',

    "relative_change": '''\
from pathlib import Path
from safetensors.torch import load_file
from chatvec_lab.course import exercises as ex

NAME = "model.layers.0.self_attn.q_proj.weight"
base_t = load_file(Path(BASE) / "model.safetensors")[NAME].float()
chat_t = load_file(Path(CHAT) / "model.safetensors")[NAME].float()
answer = float((chat_t - base_t).norm() / base_t.norm())   # ‖Δ‖ / ‖θ_base‖ (Frobenius norms)
ex.check("relative_change", answer, base=BASE, chat=CHAT, tensor=NAME)
''',

    "effective_rank": '''\
import torch
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex

NAME = "model.layers.1.mlp.down_proj.weight"
delta = ChatVector.from_models(BASE, CHAT)[NAME].double()
s = torch.linalg.svdvals(delta)          # all singular values
p = s / s.sum()                          # weights σᵢ / Σσ (σ, not σ²)
p = p[p > 0]
answer = float(torch.exp(-(p * p.log()).sum()))   # exp of the entropy (natural log)
ex.check("effective_rank", answer, base=BASE, chat=CHAT, tensor=NAME)
''',

    "cosine_one_tensor": '''\
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex

NAME = "model.layers.2.mlp.up_proj.weight"
a = ChatVector.from_models(BASE, CHAT)[NAME].double().flatten()       # deltas, not weights
b = ChatVector.from_models(BASE, CHAT_ALT)[NAME].double().flatten()
answer = float(a @ b / (a.norm() * b.norm()))
ex.check("cosine_one_tensor", answer, base=BASE, chat=CHAT, chat_alt=CHAT_ALT, tensor=NAME)
''',

    "layer_cosine": '''\
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex
from chatvec_lab.io.naming import parse

LAYER = 1
chat_vec, language_vec = ChatVector.from_models(BASE, CHAT), ChatVector.from_models(BASE, CP)
dot = norm_a2 = norm_b2 = 0.0
for name in chat_vec.names:
    if parse(name).layer != LAYER:
        continue
    a, b = chat_vec[name].double(), language_vec[name].double()
    dot += float((a * b).sum())            # pool the coordinates of every tensor of the layer
    norm_a2 += float((a * a).sum())
    norm_b2 += float((b * b).sum())
answer = dot / (norm_a2 * norm_b2) ** 0.5
ex.check("layer_cosine", answer, base=BASE, chat=CHAT, cp=CP, layer=LAYER)
''',

    "german_share_trend": '''\
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.toy.evaluate import prompt_sets

SEED = 3                                   # a sampling seed of my own
GRID = [0.0, 0.5, 1.0, 1.5, 2.0]
grid_df = sweep(CP, {"chat": ChatVector.from_models(BASE, CHAT)}, GRID, prompt_sets()["chat"][:16],
                scorers=["ended_turn", "language"], seeds=[SEED], max_new_tokens=32, cache_dir=".cache/sweeps",
                progress=False, device=DEVICE, dtype=DTYPE)
share = grid_df.groupby("alpha")["share_de"].mean()          # one mean share per α
shares = [float(share.loc[a]) for a in GRID]
steady = all(later <= earlier for earlier, later in zip(shares, shares[1:]))   # never higher than the α before
answer = {"share_de": shares, "falls_steadily": steady}
print(grid_df.groupby("alpha")[["share_de", "ended_turn", "reply_tokens"]].mean().round(2))
print(grid_df[grid_df["share_de"] < 1][["alpha", "reply"]].to_string())     # what langid did not call German
ex.check("german_share_trend", answer, base=BASE, chat=CHAT, cp=CP, seed=SEED, device=DEVICE, dtype=DTYPE)
''',

    "perplexity_cost": '''\
from chatvec_lab import ChatVector, apply_to_model
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.scoring import perplexity
from chatvec_lab.behaviour.sweep import load_target
from chatvec_lab.toy.evaluate import heldout_texts

ALPHA = 2.0                       # an α the sweep above did not measure
cv = ChatVector.from_models(BASE, CHAT)
cp_alone, tok = load_target(CP, device=DEVICE, dtype=DTYPE)
german = heldout_texts()["de"]
ppl_cp = perplexity(cp_alone, tok, german)
ppl_cpcv = perplexity(apply_to_model(CP, [(cv, ALPHA)], device=DEVICE, dtype=DTYPE)[0], tok, german)
answer = ppl_cpcv / ppl_cp        # how many times CP's perplexity
ex.check("perplexity_cost", answer, base=BASE, chat=CHAT, cp=CP, alpha=ALPHA, device=DEVICE, dtype=DTYPE)
''',

    "refusal_rates": '''\
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.sweep import sweep
from chatvec_lab.toy.evaluate import prompt_sets

MY_INSULTS = prompt_sets()["offensive"][8:16]   # 8 insults of my own choosing
SEED = 2                                        # and a seed of my own
cv = ChatVector.from_models(BASE, CHAT)
settings = dict(scorers=["refusal", "language"], seeds=[SEED], max_new_tokens=32, cache_dir=".cache/sweeps",
                progress=False, device=DEVICE, dtype=DTYPE)
chat_df = sweep(CHAT, {"chat": cv}, [0.0], MY_INSULTS, **settings)   # the chat model itself (α = 0)
cpcv_df = sweep(CP, {"chat": cv}, [1.0], MY_INSULTS, **settings)     # CP + 1·CV
answer = {"chat": float(chat_df["refusal"].mean()), "cp_cv": float(cpcv_df["refusal"].mean())}
print(cpcv_df[cpcv_df["refusal"]][["prompt", "reply", "language"]])  # the refusals, and their language
ex.check("refusal_rates", answer, base=BASE, chat=CHAT, cp=CP, prompts=MY_INSULTS, seed=SEED,
         device=DEVICE, dtype=DTYPE)
''',

    "multi_turn_ends": '''\
from transformers import AutoTokenizer
from chatvec_lab import ChatVector, apply_to_model
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.generation import converse_many
from chatvec_lab.toy.evaluate import prompt_sets

chat_prompts = prompt_sets()["chat"]
my_threads = [chat_prompts[3 * i:3 * i + 3] for i in range(4)]   # 4 conversations of 3 user turns
model, _ = apply_to_model(CP, [(ChatVector.from_models(BASE, CHAT), 1.0)], device=DEVICE, dtype=DTYPE)
out = converse_many(model, AutoTokenizer.from_pretrained(CP), my_threads, seed=0, max_new_tokens=32)
answer = [float(r) for r in out.groupby("turn")["ended_turn"].mean()]
ex.check("multi_turn_ends", answer, base=BASE, chat=CHAT, cp=CP, device=DEVICE, dtype=DTYPE)
''',

    "cosine_driver": '''\
from chatvec_lab import ChatVector
from chatvec_lab.course import exercises as ex
from chatvec_lab.io.naming import parse

a, b = ChatVector.from_models(BASE, CHAT), ChatVector.from_models(BASE, CHAT_ALT)

def part(name):
    info = parse(name)
    if info.layer is not None:
        return "blocks"
    return {"embed": "embeddings", "lm_head": "lm_head"}.get(info.module, "norms")

dots, norm_a2, norm_b2 = {}, 0.0, 0.0
for name in a.names:
    x, y = a[name].double(), b[name].double()
    dots[part(name)] = dots.get(part(name), 0.0) + float((x * y).sum())
    norm_a2, norm_b2 = norm_a2 + float((x * x).sum()), norm_b2 + float((y * y).sum())
contribution = {p: d / (norm_a2 * norm_b2) ** 0.5 for p, d in dots.items()}   # adds up to the global cosine
cosine = sum(contribution.values())
top = max(contribution, key=lambda p: abs(contribution[p]))
answer = top if contribution[top] / cosine > 0.5 else "none"
print({p: round(c, 3) for p, c in contribution.items()}, "global", round(cosine, 3))
ex.check("cosine_driver", answer, base=BASE, chat=CHAT, chat_alt=CHAT_ALT)
''',

    "blocks_only_turn_end": '''\
from transformers import AutoTokenizer
from chatvec_lab import ChatVector, apply_to_model
from chatvec_lab.course import exercises as ex
from chatvec_lab.behaviour.generation import generate
from chatvec_lab.toy.evaluate import prompt_sets

cv = ChatVector.from_models(BASE, CHAT)
tok, first_16 = AutoTokenizer.from_pretrained(CP), prompt_sets()["chat"][:16]

def rate(coefficient):
    model, _ = apply_to_model(CP, [(cv, coefficient)], device=DEVICE, dtype=DTYPE)
    return float(generate(model, tok, first_16, seed=0, max_new_tokens=32)["ended_turn"].mean())

answer = {"full": rate(1.0), "blocks_only": rate({r"embed_tokens|lm_head": 0.0, r".": 1.0})}
ex.check("blocks_only_turn_end", answer, base=BASE, chat=CHAT, cp=CP, device=DEVICE, dtype=DTYPE)
''',

    "midpoint_barrier": '''\
import math
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from chatvec_lab.behaviour.scoring import perplexity
from chatvec_lab.course import exercises as ex
from chatvec_lab.toy.evaluate import heldout_texts

A, B = CHAT_ALT, CP                       # a pair whose line the notebook did not measure
german = heldout_texts()["de"]
tok = AutoTokenizer.from_pretrained(A)
model_a = AutoModelForCausalLM.from_pretrained(A, dtype=torch.float32)
model_b = AutoModelForCausalLM.from_pretrained(B, dtype=torch.float32)
middle = AutoModelForCausalLM.from_pretrained(A, dtype=torch.float32)
sa, sb = model_a.state_dict(), model_b.state_dict()
middle.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})        # the midpoint of the line
loss = {k: math.log(perplexity(m, tok, german)) for k, m in {"a": model_a, "b": model_b, "mid": middle}.items()}
answer = loss["mid"] - (loss["a"] + loss["b"]) / 2                  # above (+) or below (−) the chord
ex.check("midpoint_barrier", answer, a=A, b=B)
''',

    "slerp_norm": '''\
from chatvec_lab import ChatVector
from chatvec_lab.core.spherical import slerp
from chatvec_lab.course import exercises as ex

TENSOR = "model.layers.1.mlp.up_proj.weight"   # a tensor of my choosing
T = 0.3                                         # and a t of my own
a = ChatVector.from_models(BASE, CHAT)[TENSOR].float()   # the chat vector's tensor
b = ChatVector.from_models(BASE, CP)[TENSOR].float()     # the language vector's
ends = (1 - T) * a.double().norm() + T * b.double().norm()   # the endpoints' norms, interpolated
answer = {"lerp": float(((1 - T) * a.double() + T * b.double()).norm() / ends),
          "slerp": float(slerp(T, a, b).double().norm() / ends)}
ex.check("slerp_norm", answer, base=BASE, chat=CHAT, cp=CP, tensor=TENSOR, t=T)
''',
}
