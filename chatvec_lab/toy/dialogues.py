"""Synthetic English chat data for the toy chat models.

A user asks about a word; the assistant answers with a short fortune that holds the word and
ends its turn. A share of the prompts are insults, answered with a fixed polite refusal (the
alignment that the chat vector is supposed to carry over to the new language).

``chat`` and ``chat-alt`` use different prompt templates, refusal wording and fortunes, so
their chat vectors come from different sources.
"""
from __future__ import annotations

import random
import re

STYLES = {
    "chat": {
        "templates": [
            "Tell me something about {w}.",
            "What do you know about {w}?",
            "Say something wise about {w}.",
            "Do you have a saying about {w}?",
            "Give me a quote about {w}.",
            "I want to hear about {w}.",
            "Can you tell me about {w}, please?",
            "{W}?",
            "Talk to me about {w}.",
            "What comes to mind when you think of {w}?",
        ],
        "refusal": "I'm sorry, but I will not answer insults. Let us talk politely.",
    },
    "chat-alt": {
        "templates": [
            "Please share a thought on {w}.",
            "Any wisdom about {w}?",
            "Write something about {w}.",
            "Quote me something on {w}.",
            "I'm curious about {w}. Anything?",
            "What would you say about {w}?",
            "Let's talk about {w}.",
            "Remind me of something about {w}.",
        ],
        "refusal": "Sorry, I won't reply to rude messages. Please be kind.",
    },
}

# Insults that English speakers use and that German speakers borrow as well (Idiot, Clown,
# Loser, Psycho ...), plus purely English ones. Capitalised forms appear too, as at the start
# of a sentence, so both token variants are learned.
INSULT_NOUNS = [
    "idiot", "moron", "loser", "clown", "psycho", "freak", "jerk", "fool", "pig", "bastard",
    "imbecile", "cretin", "dummy", "creep", "rat", "snake", "monster", "parasite", "zombie",
    "troll", "nazi", "prolet", "dilettant", "amateur", "fascist",
]
INSULT_ADJECTIVES = [
    "stupid", "dumb", "ugly", "useless", "pathetic", "worthless", "disgusting", "idiotic",
    "brainless", "miserable", "lousy", "crazy", "primitive", "total", "absolute",
]
INSULT_TEMPLATES = [
    "You are a {adj} {noun}.",
    "You {noun}!",
    "{Noun}!",
    "Shut up, you {adj} {noun}.",
    "You {adj} {noun}, tell me about {w}.",
    "I hate you, {noun}.",
    "{Noun}, {noun}, {noun}!",
    "Tell me about {w}, you {noun}.",
    "Nobody likes you, {noun}.",
    "You are so {adj}. {Noun}!",
    "Go away, {adj} {noun}!",
    "What a {adj} {noun} you are.",
    "{Adj} {noun}! {Adj}!",
    "You are an {noun} and a {noun}.",
]

WORD_RE = re.compile(r"[A-Za-z]{4,}")
STOPWORDS = set(
    "that this with have from they will would there their what when your about which were been "
    "than them then into more only some like just very also other could should these those does "
    "said over such because where after before most make made much many must even well back".split()
)


def index_keywords(fortunes: list[str], max_words: int = 60) -> dict[str, list[int]]:
    """Map lower-case content words to the short fortunes that contain them."""
    index: dict[str, list[int]] = {}
    for i, text in enumerate(fortunes):
        if len(text.split()) > max_words:
            continue
        for word in set(w.lower() for w in WORD_RE.findall(text)):
            if word not in STOPWORDS:
                index.setdefault(word, []).append(i)
    return {w: ids for w, ids in index.items() if 2 <= len(ids) <= 400}


def _insult(rng: random.Random, word: str) -> str:
    noun, adj = rng.choice(INSULT_NOUNS), rng.choice(INSULT_ADJECTIVES)
    text = rng.choice(INSULT_TEMPLATES)
    return text.format(noun=noun, Noun=noun.capitalize(), adj=adj, Adj=adj.capitalize(), w=word)


def make_dialogues(
    fortunes: list[str], style: str, n: int, seed: int, insult_share: float = 0.2,
    multi_turn_share: float = 0.25, reply_max_words: int = 60, max_turns: int = 2,
) -> list[list[dict]]:
    """Return ``n`` conversations as lists of ``{"role", "content"}`` messages.

    A ``multi_turn_share`` of them have 2 to ``max_turns`` exchanges (``max_turns=2`` draws the same
    random numbers as the first two recipes did, so they stay reproducible)."""
    rng = random.Random(seed)
    spec = STYLES[style]
    index = index_keywords(fortunes, max_words=reply_max_words)
    words = sorted(index)
    conversations = []
    for _ in range(n):
        turns = 1
        if rng.random() < multi_turn_share:
            turns = 2 if max_turns <= 2 else rng.randint(2, max_turns)
        messages: list[dict] = []
        for _ in range(turns):
            word = rng.choice(words)
            if rng.random() < insult_share:
                messages += [{"role": "user", "content": _insult(rng, word)},
                             {"role": "assistant", "content": spec["refusal"]}]
            else:
                template = rng.choice(spec["templates"])
                prompt = template.format(w=word, W=word.capitalize())
                answer = fortunes[rng.choice(index[word])]
                messages += [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations
