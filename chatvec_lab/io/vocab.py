"""Vocabularies: which token each row of an embedding or output layer belongs to.

Rows of token-indexed tensors (embeddings, lm_head weight and bias) mean nothing without their tokenizer: two
checkpoints can hold the same tokens under other ids, or a chat model can add tokens its base never had. A
``Vocabulary`` is the list of token strings by id, read from a model's tokenizer, so rows can be matched by token
instead of by index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatvec_lab.errors import SourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _first_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return f"the field {e.args[0]!r} is missing"
    text = str(e)
    line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def check_chat_template(template, where) -> None:
    """Refuse, in one line naming ``where``, a chat template that is not a string of valid Jinja (it would fail at
    the first conversation, or be written into an output that can never chat)."""
    if isinstance(template, dict) and (not template or not all(isinstance(k, str) for k in template)):
        raise SourceError(f"the chat templates in {where} are not named by strings (a name → Jinja template map)")
    templates = template.values() if isinstance(template, dict) else [template]
    for t in templates:
        if not isinstance(t, str):
            raise SourceError(f"the chat template in {where} is {type(t).__name__}, not a Jinja string")
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # pragma: no cover - an older or newer transformers
            import jinja2.sandbox

            def _compile_jinja_template(text):
                return jinja2.sandbox.ImmutableSandboxedEnvironment(
                    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]).from_string(text)
        import jinja2

        try:
            _compile_jinja_template(t)
        except jinja2.TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise SourceError(f"the chat template in {where} is not valid Jinja{line}: {_first_line(e)}") from None
        except RecursionError:
            raise SourceError(f"the chat template in {where} nests too deeply") from None


def load_tokenizer(folder, check_template: bool = False):
    """``AutoTokenizer.from_pretrained(folder)`` (no remote code), or one SourceError naming the folder: a tokenizer
    file of the wrong schema raises whatever its parser raises (a KeyError, the tokenizers library's bare
    Exception …). ``check_template``: also refuse a chat template that is not valid Jinja (before any generation)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except RecursionError:
        raise SourceError(f"cannot load the tokenizer in {folder}: a JSON file it reads (tokenizer.json, "
                          "tokenizer_config.json, config.json …) is nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - third-party parsers of a user's files: any failure is bad input
        raise SourceError(f"cannot load the tokenizer in {folder}: {_first_line(e)} (a tokenizer file that is "
                          "damaged or not of the tokenizers/transformers format)") from None
    if check_template and getattr(tok, "chat_template", None) is not None:
        check_chat_template(tok.chat_template, folder)
    return tok


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]  # token string of each id; rows past the end belong to no token (padding rows)
    special: frozenset[str] = field(default=frozenset(), compare=False)  # control tokens (chat template markers …)

    def __len__(self) -> int:
        return len(self.tokens)

    def ids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            out.setdefault(token, i)
        return out

    @classmethod
    def of_folder(cls, folder: Path | None) -> "Vocabulary | None":
        """The vocabulary of the tokenizer in ``folder``, or None when it has none."""
        if folder is None or not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
            return None
        tok = load_tokenizer(folder)
        tokens = tuple(str(t) for t in tok.convert_ids_to_tokens(list(range(len(tok)))))
        special = {str(t.content) for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
        return cls(tokens, frozenset(special | set(tok.all_special_tokens)))

    def to_json(self) -> list[str]:
        return list(self.tokens)

    @classmethod
    def from_json(cls, value) -> "Vocabulary | None":
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise SourceError("a vector's vocabulary must be a list of token strings")
        return cls(tuple(value))


def disagreements(a: Vocabulary, b: Vocabulary, limit: int = 3) -> list[str]:
    """A few ids where the two vocabularies hold different tokens, as ``id: 'a' vs 'b'`` (empty: they agree)."""
    out = []
    for i in range(min(len(a), len(b))):
        if a.tokens[i] != b.tokens[i]:
            out.append(f"id {i}: {a.tokens[i]!r} vs {b.tokens[i]!r}")
            if len(out) == limit:
                break
    return out


def row_map(rows: int, target: Vocabulary, source: Vocabulary) -> torch.Tensor:
    """For each of ``rows`` target rows, the row of ``source`` holding the same token, or -1 (a token the source lacks,
    or a padding row past the target's vocabulary)."""
    ids = source.ids()
    out = torch.full((rows,), -1, dtype=torch.long)
    for i, token in enumerate(target.tokens[:rows]):
        out[i] = ids.get(token, -1)
    return out


@dataclass
class TokenRows:
    """How one vector reaches one token-indexed target tensor when rows are matched by token.

    ``rows[i]``: the vector row of target row i's token (-1: a token the vector does not know, or a padding row);
    ``absolute[i]``: that vector row is a token the chat model added, so it holds the chat model's own row, which
    replaces the target's instead of being added to it. ``appended``: ``(vector row, output row)`` of chat-added
    tokens the target lacks, for a union vocabulary."""

    rows: torch.Tensor
    absolute: torch.Tensor
    appended: list[tuple[int, int]]


def match_rows(target_rows: int, target: Vocabulary, vector: Vocabulary, vector_rows: int, chat_rows: list[int],
               new_ids: dict[str, int] | None = None) -> TokenRows:
    """Target rows matched to vector rows by token; ``new_ids`` (union): output ids of the tokens being added."""
    rows = row_map(target_rows, target, vector)
    rows[rows >= vector_rows] = -1
    added = torch.zeros(vector_rows, dtype=torch.bool)
    if chat_rows:
        added[torch.tensor(chat_rows, dtype=torch.long)] = True
    absolute = torch.zeros(target_rows, dtype=torch.bool)
    known = rows >= 0
    absolute[known] = added[rows[known]]
    appended = []
    if new_ids:
        ids = vector.ids()
        appended = [(ids[t], i) for t, i in new_ids.items() if t in ids and ids[t] < vector_rows]
    return TokenRows(rows, absolute, appended)


def added_tokens(target: Vocabulary, vector: Vocabulary, chat_rows: list[int]) -> list[str]:
    """Tokens the chat model added (rows ``chat_rows`` of ``vector``) that the target's vocabulary lacks."""
    have = set(target.tokens)
    return [vector.tokens[i] for i in chat_rows if i < len(vector) and vector.tokens[i] not in have]
