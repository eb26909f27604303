"""What a merged model takes from tokenizers: the chat model's template and end of turn, chosen token rows, new tokens.

* ``chat_turn_of``: the chat template and end-of-turn tokens of a chat model (``chat_template_from``), mapped
  into the target's vocabulary by token string: an output that takes the template also stops where the chat
  model stops. A model without a template, or end-of-turn tokens the target's tokenizer lacks, is refused
  before the merge.
* ``TokenMap``: rows of chosen tokens copied from the chat model's embedding and lm_head (``token_map``).
* ``grow_vocabulary``: a union vocabulary's output tokenizer gains the tokens the chat model added.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from chatvec_lab.errors import MismatchError, SourceError, UsageError
from chatvec_lab.io.formats import read_json_object
from chatvec_lab.io.naming import parse
from chatvec_lab.io.output import write_json
from chatvec_lab.io.sources import WeightSource, model_folder
from chatvec_lab.io.vocab import check_chat_template, load_tokenizer


@dataclass
class ChatTurn:
    """What a merged model needs from the chat model to chat like it: its template and where its turns end."""

    template: str
    eos_token: str | None  # the chat tokenizer's end-of-turn token (e.g. Llama-3's <|eot_id|>)
    eos_ids: list[int]  # in the target's vocabulary: where generation stops (the chat model's ids, then the target's)
    source: str = ""

    def describe(self) -> str:
        return (f"chat template and end of turn from {self.source}: eos_token {self.eos_token!r}, "
                f"generation stops at token ids {self.eos_ids}")


def chat_turn_of(spec, target_folder: Path | None) -> ChatTurn | None:
    """The chat template and end-of-turn tokens of the model ``spec``, mapped into the target's vocabulary by token
    string; None when no spec is given. Refuses a model without a template, and end-of-turn tokens the target's
    tokenizer lacks."""
    if spec is None:
        return None
    folder = model_folder(spec)
    template = read_chat_template(folder) if folder else None
    if template is None:
        raise SourceError(f"no chat template found in {spec}")
    check_chat_template(template, spec)  # before the merge: never written into an output that cannot chat
    chat_tokens = _eos_tokens(folder)
    eos_token = chat_tokens[0] if chat_tokens else None
    if target_folder is None or not chat_tokens:
        return ChatTurn(template, eos_token, [], str(spec))
    target_tok = _tokenizer(target_folder)
    if target_tok is None:
        return ChatTurn(template, eos_token, [], str(spec))
    ids = []
    for token in chat_tokens + _eos_tokens(target_folder):
        tid = target_tok.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or (tid == target_tok.unk_token_id and token != target_tok.unk_token):
            if token in chat_tokens:
                raise MismatchError(f"the chat model {spec} ends its turns with {token!r}, which the target's "
                                    "tokenizer lacks: the merged model could never stop where the chat model does")
            continue
        if tid not in ids:
            ids.append(tid)
    return ChatTurn(template, eos_token, ids, str(spec))


def _tokenizer(folder: Path):
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return load_tokenizer(folder)


def _eos_tokens(folder: Path) -> list[str]:
    """A model's end tokens as strings: its tokenizer's eos_token, then its generation_config's eos_token_id(s)."""
    tokens: list[str] = []
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        eos = read_json_object(cfg, "tokenizer config").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            tokens.append(eos)
    gen = folder / "generation_config.json"
    if gen.is_file():
        ids = read_json_object(gen, "generation config").get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
        tok = _tokenizer(folder) if ids else None
        if tok is not None:
            for i in ids:
                if isinstance(i, int) and not isinstance(i, bool):
                    if not 0 <= i < len(tok):
                        raise SourceError(f"bad generation config {gen}: eos_token_id {i} is not a token id of the "
                                          f"tokenizer beside it (0 to {len(tok) - 1})")
                    token = tok.convert_ids_to_tokens(i)
                    if isinstance(token, str) and token not in tokens:
                        tokens.append(token)
    return tokens


def read_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, else its tokenizer config's; None without one."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        value = read_json_object(cfg, "tokenizer config").get("chat_template")
        if isinstance(value, str):
            return value
    return None


class TokenMap:
    """Rows of chosen tokens taken from the chat model's embedding and lm_head (the paper's special-token fix)."""

    def __init__(self, token_map, chat: WeightSource, target_folder: Path | None, chat_folder: Path | None):
        if target_folder is None or chat_folder is None:
            raise SourceError("a token map needs the tokenizers of both the target and the chat model")
        ttok = load_tokenizer(target_folder)
        ctok = load_tokenizer(chat_folder)
        pairs = token_map.items() if isinstance(token_map, Mapping) else [(t, t) for t in token_map]
        for pair in pairs:
            if not all(isinstance(t, str) and t for t in pair):
                raise UsageError(f"token map entries must be token strings, not {pair[0]!r}")
        self.rows: list[tuple[int, int, str]] = []
        for target_token, chat_token in pairs:
            tid, cid = _token_id(ttok, target_token, "target"), _token_id(ctok, chat_token, "chat")
            self.rows.append((tid, cid, target_token))
        self.chat = chat

    def apply(self, name: str, tensor: torch.Tensor) -> bool:
        if not parse(name).is_embedding_like or name not in self.chat:
            return False
        chat_t = self.chat.get(name)
        for tid, cid, token in self.rows:
            if tid >= tensor.shape[0] or cid >= chat_t.shape[0]:
                raise MismatchError(f"token {token!r}: row {tid}/{cid} is outside {name!r}")
            tensor[tid] = chat_t[cid].to(tensor.dtype)
        return True


def _token_id(tokenizer, token: str, which: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or not isinstance(tid, int):
        raise MismatchError(f"token {token!r} is not a single token in the {which} tokenizer")
    return tid


def grow_vocabulary(target_folder: Path | None, out: Path, new_tokens: dict[str, int], pairs, plans) -> None:
    """A union vocabulary: the output's tokenizer gains the chat-added tokens, at the ids their rows were written
    to, and its config the new vocabulary size. ``pairs``: the ``(vector, alpha)`` applied (their metadata say
    which added tokens are special); ``plans``: the tensors' plans (the rows they were written with)."""
    from tokenizers import AddedToken

    tok = load_tokenizer(target_folder)
    special = set()
    for vec, _ in pairs:
        special |= set(vec.metadata.get("special_tokens") or [])
    tok.add_tokens([AddedToken(t, special=t in special, normalized=False) for t in new_tokens])
    got = {t: tok.convert_tokens_to_ids(t) for t in new_tokens}
    if got != new_tokens:
        raise MismatchError(f"the target's tokenizer gave the added tokens other ids than planned: {got}")
    tok.save_pretrained(str(out))
    rows = max((p.out_rows for p in plans.values() if p.out_rows), default=None)
    cfg_file = out / "config.json"
    if rows and cfg_file.is_file():
        cfg = read_json_object(cfg_file, "config")
        holder = cfg["text_config"] if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
        holder["vocab_size"] = rows
        write_json(cfg_file, cfg)
