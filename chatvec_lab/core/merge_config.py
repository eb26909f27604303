"""mergekit's YAML, read and checked: which models, which method, which parameters for each tensor.

    config = read_config("merge.yml")          # a path, YAML text's dict, or a dict
    config.parameters_for("model.layers.3.mlp.up_proj.weight")   # → (shared, per-source lists)

The fields the lab knows: ``models`` (each ``model`` with its ``parameters``), ``base_model``,
``merge_method`` (a name of ``REGISTRY``), ``parameters`` (shared ones, and per-source defaults), ``dtype``,
``out_dtype`` and ``tokenizer_source`` (``base``, or a model whose tokenizer files the output takes). A
parameter may be a number, a gradient (a list, interpolated over the layers as mergekit does: layer i of n at
``i / (n − 1)``, tensors outside the layers at 0) or filtered values (``[{filter: self_attn, value: 0.5},
{value: 1}]``, the first whose filter is in the tensor's name). Anything else — ``slices``, ``modules``,
``tokenizer``, ``chat_template``, ``tokenizer_source: union``, a LoRA reference ``model+lora``, a method or a
parameter the lab lacks — is refused in one line naming it (``UsageError``), before any tensor is read; so are
YAML anchors and aliases (``load_yaml``), a model listed twice however spelled (``model_identity``) and a density
of 0 or less (above 1 counts as 1, as in mergekit). Values quoted in messages are cut to ``QUOTE_LIMIT`` characters.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatvec_lab.core.merge_methods import REGISTRY, REQUIRED, MergeMethod
from chatvec_lab.errors import UsageError, clip

KNOWN_FIELDS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
LACKING_FIELDS = {"slices": "layer slices (frankenmerges)", "modules": "per-module merges",
                  "tokenizer": "vocabulary surgery (the tokenizer field)", "chat_template": "chat_template"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUOTE_LIMIT = 200  # characters of a config's value quoted in an error message


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for a one-line message, cut to ``limit`` characters (nested values abbreviated first)."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        text = short.repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        text = f"<an integer of more than {limit} digits>"
    return clip(text, limit)


def _no_alias_loader():
    """yaml's SafeLoader, refusing anchors and aliases as it composes: a few hundred bytes of nested aliases
    expand to gigabytes (a "billion laughs"), and mergekit's configs do not need them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise UsageError(f"{getattr(self, 'origin', 'the config')} uses a YAML anchor or alias "
                                 f"({'*' if isinstance(event, yaml.AliasEvent) else '&'}{clip(str(event.anchor), 40)}"
                                 f", line {event.start_mark.line + 1}), which a merge config does not take: "
                                 "write each value out")
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_yaml(origin: Path):
    """A merge config file's YAML (safe, without anchors or aliases); one line on what is wrong with it."""
    import yaml

    loader = _no_alias_loader()(origin.read_text(encoding="utf-8"))
    loader.origin = origin
    try:
        return loader.get_single_data()
    except UsageError:
        raise
    except yaml.YAMLError as e:
        raise UsageError(f"{origin} is not YAML: {clip(' '.join(str(e).split()), 2 * QUOTE_LIMIT)}") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise UsageError(f"{origin} holds a value the lab cannot read: {clip(' '.join(str(e).split()))}") from None
    except RecursionError:
        raise UsageError(f"{origin} nests its values too deeply to be a merge config") from None
    finally:
        loader.dispose()


@dataclass
class MergeConfig:
    """A checked config: ``inputs`` are the models in mergekit's order (the base appended if not listed);
    ``base`` is the base's index in ``inputs`` (None for a method without one); ``sources`` the others."""
    method: MergeMethod
    inputs: list[str]
    base: int | None
    settings: list[dict]  # per input: its own parameters
    shared: dict  # the config's ``parameters``
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    origin: Path | None = None
    num_layers: int = 0  # set once the tensor names are known (for gradients)
    raw: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[int]:
        return [i for i in range(len(self.inputs)) if i != self.base]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype in ("float64",) else torch.float32

    def output_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        """``out_dtype``, else ``dtype``, else the base's (or first model's) own dtype for the tensor."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else source_dtype

    def position(self, name: str) -> float:
        """mergekit's ``t`` for gradients: layer i of n at i / (n − 1); other tensors at 0."""
        from chatvec_lab.io.naming import parse

        layer = parse(name).layer
        if layer is None:
            return 0.0
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0

    def parameters_for(self, name: str) -> tuple[dict, dict]:
        """(shared values, per-source value lists aligned with ``sources``) for one tensor."""
        t, m = self.position(name), self.method
        shared = {k: _resolve(k, [self.shared], name, t, default, m) for k, default in m.shared.items()}
        per = {k: [_resolve(k, [self.settings[i], self.shared], name, t, default, m, self.inputs[i])
                   for i in self.sources] for k, default in m.per_source.items()}
        return shared, per


def _check_value(key: str, value, kind, method: MergeMethod):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UsageError(f"{method.name} parameter {key} must be true or false, not {quoted(value)}")
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float's range
        number = math.nan
    if not math.isfinite(number):
        raise UsageError(f"{method.name} parameter {key} must be a finite number, not {quoted(value)}")
    if kind is int:
        if number != int(number):
            raise UsageError(f"{method.name} parameter {key} must be a whole number, not {quoted(value)}")
        return int(number)
    return number


def _evaluate(key: str, setting, name: str, t: float, kind, method: MergeMethod):
    """mergekit's ``evaluate_setting``: a scalar, a gradient over the layers, or filtered values."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _check_value(key, setting, kind, method)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [_check_value(key, e, kind, method) for e in setting]
            if kind is bool:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return _check_value(key, (1 - frac) * values[i0] + frac * values[i1], kind, method)
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
                raise UsageError(f"parameter {key}: {quoted(cond)} is not a value, a gradient or {{filter, value}}")
            f = cond.get("filter")
            if f is not None and not isinstance(f, str):
                raise UsageError(f"parameter {key}: filter {quoted(f)} is not a string (a part of tensor names)")
            if f is None or f == "*" or (name and f in name):
                return _evaluate(key, cond["value"], name, t, kind, method)
        return None
    raise UsageError(f"parameter {key}: {quoted(setting)} is not a value, a gradient or {{filter, value}}")


def _resolve(key, scopes, name, t, default, method: MergeMethod, model: str | None = None):
    kind = method.types.get(key, float)
    where = f"{clip(model)}: " if model else ""
    for scope in scopes:
        if scope and key in scope:
            try:
                value = _evaluate(key, scope[key], name, t, kind, method)
            except UsageError as e:
                raise UsageError(f"{where}{e}") from None
            if key == "density" and value is not None and value <= 0:  # as mergekit, a density above 1 keeps all
                raise UsageError(f"{where}{method.name} parameter density must be in (0, 1]; values above 1 count "
                                 f"as 1 (not {quoted(value)})")
            if value is not None:
                return value
    if default is REQUIRED:
        raise UsageError(f"{where}{method.name} needs parameter {quoted(key)} for tensor {quoted(name)}")
    return default


def _reference(value, what: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:  # {model: {path: …}}: mergekit's long form
        value = value["model"]
    if isinstance(value, dict) and "path" in value and not value.get("lora"):
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a model (a path or hub id), not {quoted(value)}")
    if "+" in value:
        raise UsageError(f"{what} {quoted(value)}: a model with a LoRA applied (model+lora) is not in the lab; "
                         "merge the adapter first")
    return value


def _exists(path) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a NUL byte, a name too long …
        return False


def locate(spec: str, origin: Path | None) -> str:
    """A model as the config names it: a path from the working folder (as mergekit), else from the config's
    folder (``origin``: the config file), else a hub id."""
    if _exists(spec) or origin is None:
        return spec
    beside = origin.parent / spec
    return str(beside) if _exists(beside) else spec


def model_identity(spec: str, origin: Path | None) -> str:
    """What makes two of a config's models one: a local model's real path (links, ``.`` and ``..`` resolved),
    else the hub id as written."""
    found = locate(spec, origin)
    return os.path.realpath(found) if _exists(found) else spec


def read_config(config) -> MergeConfig:
    """Read and check a mergekit config (a YAML file's path, or its dict); one line on what the lab lacks."""
    origin = None
    if isinstance(config, (str, Path)) and not isinstance(config, dict):
        origin = Path(config)
        if not origin.is_file():
            raise UsageError(f"no merge config at {origin}")
        try:
            config = load_yaml(origin)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the merge config {origin}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict):
        raise UsageError("a merge config is a mapping with models, merge_method and (mostly) base_model")
    for key in config:
        if key in LACKING_FIELDS:
            raise UsageError(f"the config uses {quoted(key)} ({LACKING_FIELDS[key]}), which the lab does not have; "
                             "it merges whole models (models:)")
        if key not in KNOWN_FIELDS:
            raise UsageError(f"the config has field {quoted(key)}, which is not a mergekit field the lab knows "
                             f"({', '.join(sorted(KNOWN_FIELDS))})")
    name = config.get("merge_method")
    if not isinstance(name, str) or name not in REGISTRY:
        raise UsageError(f"merge_method {quoted(name)} is not in the lab (it has {', '.join(REGISTRY)})")
    method = REGISTRY[name]
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise UsageError("the config lists no models (models: [- model: PATH, …])")
    inputs, settings = [], []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise UsageError(f"models[{i}] must be {{model: PATH, parameters: {{…}}}}, not {quoted(entry)}")
        inputs.append(_reference(entry["model"], f"models[{i}]"))
        settings.append(_parameters(entry.get("parameters"), method, f"models[{i}] parameters", per_source=True))
    identities = [model_identity(spec, origin) for spec in inputs]
    for i, identity in enumerate(identities):
        if identity in identities[:i]:
            first = inputs[identities.index(identity)]
            same = "" if first == inputs[i] else f" and {quoted(inputs[i])} (both {clip(identity)})"
            raise UsageError(f"a model is listed twice: {quoted(first)}{same}")
    base = None
    if config.get("base_model") is not None:
        base_ref = _reference(config["base_model"], "base_model")
        base_identity = model_identity(base_ref, origin)
        if base_identity not in identities:  # mergekit adds it to the inputs
            inputs.append(base_ref)
            settings.append({})
            identities.append(base_identity)
        if method.base != "input":
            base = identities.index(base_identity)
    elif method.base == "required":
        raise UsageError(f"{name} needs base_model")
    shared = _parameters(config.get("parameters"), method, "parameters", per_source=False)
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and (not isinstance(config[key], str) or config[key] not in DTYPES):
            raise UsageError(f"{key} {quoted(config[key])} is not one of {', '.join(DTYPES)}")
    tokenizer = config.get("tokenizer_source")
    if tokenizer is not None:
        if tokenizer == "union":
            raise UsageError("tokenizer_source: union (a merged vocabulary) is not in the lab; use base or a model "
                             "whose vocabulary the others share")
        tokenizer = None if tokenizer == "base" else _reference(tokenizer, "tokenizer_source")
    result = MergeConfig(method, inputs, base, settings, shared, config.get("dtype"), config.get("out_dtype"),
                         tokenizer, origin, raw=config)
    n = len(result.sources)
    if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
        most = f"at most {method.max_sources}" if method.max_sources is not None else "any number of"
        raise UsageError(f"{name} merges at least {method.min_sources} and {most} model(s) besides the base; "
                         f"the config gives {n}")
    return result


def _parameters(params, method: MergeMethod, what: str, per_source: bool) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise UsageError(f"{what} must be a mapping, not {quoted(params)}")
    allowed = set(method.per_source) | (set() if per_source else set(method.shared))
    for key in params:
        if key not in allowed:
            where = "per model" if per_source and key in method.shared else "here"
            raise UsageError(f"{what}: {method.name} has no parameter {quoted(key)} {where} (it takes "
                             f"{', '.join(sorted(allowed)) or 'none'})")
    return dict(params)
