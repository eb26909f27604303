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
parameter the lab lacks — is refused in one line naming it (``UsageError``), before any tensor is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatvec_lab.core.merge_methods import REGISTRY, REQUIRED, MergeMethod
from chatvec_lab.errors import UsageError

KNOWN_FIELDS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
LACKING_FIELDS = {"slices": "layer slices (frankenmerges)", "modules": "per-module merges",
                  "tokenizer": "vocabulary surgery (the tokenizer field)", "chat_template": "chat_template"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        raise UsageError(f"{method.name} parameter {key} must be true or false, not {value!r}")
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UsageError(f"{method.name} parameter {key} must be a number, not {value!r}")
    if kind is int:
        if number != int(number):
            raise UsageError(f"{method.name} parameter {key} must be a whole number, not {value!r}")
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
                raise UsageError(f"parameter {key}: {cond!r} is not a value, a gradient or {{filter, value}}")
            f = cond.get("filter")
            if f is None or f == "*" or (name and f in name):
                return _evaluate(key, cond["value"], name, t, kind, method)
        return None
    raise UsageError(f"parameter {key}: {setting!r} is not a value, a gradient or {{filter, value}}")


def _resolve(key, scopes, name, t, default, method: MergeMethod, model: str | None = None):
    kind = method.types.get(key, float)
    for scope in scopes:
        if scope and key in scope:
            value = _evaluate(key, scope[key], name, t, kind, method)
            if value is not None:
                return value
    if default is REQUIRED:
        where = f"{model}: " if model else ""
        raise UsageError(f"{where}{method.name} needs parameter {key!r} for tensor {name!r}")
    return default


def _reference(value, what: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:  # {model: {path: …}}: mergekit's long form
        value = value["model"]
    if isinstance(value, dict) and "path" in value and not value.get("lora"):
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise UsageError(f"{what} must be a model (a path or hub id), not {value!r}")
    if "+" in value:
        raise UsageError(f"{what} {value!r}: a model with a LoRA applied (model+lora) is not in the lab; "
                         "merge the adapter first")
    return value


def read_config(config) -> MergeConfig:
    """Read and check a mergekit config (a YAML file's path, or its dict); one line on what the lab lacks."""
    import yaml

    origin = None
    if isinstance(config, (str, Path)) and not isinstance(config, dict):
        origin = Path(config)
        if not origin.is_file():
            raise UsageError(f"no merge config at {origin}")
        try:
            config = yaml.safe_load(origin.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UsageError(f"{origin} is not YAML: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise UsageError("a merge config is a mapping with models, merge_method and (mostly) base_model")
    for key in config:
        if key in LACKING_FIELDS:
            raise UsageError(f"the config uses {key!r} ({LACKING_FIELDS[key]}), which the lab does not have; "
                             "it merges whole models (models:)")
        if key not in KNOWN_FIELDS:
            raise UsageError(f"the config has field {key!r}, which is not a mergekit field the lab knows "
                             f"({', '.join(sorted(KNOWN_FIELDS))})")
    name = config.get("merge_method")
    if name not in REGISTRY:
        raise UsageError(f"merge_method {name!r} is not in the lab (it has {', '.join(REGISTRY)})")
    method = REGISTRY[name]
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise UsageError("the config lists no models (models: [- model: PATH, …])")
    inputs, settings = [], []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise UsageError(f"models[{i}] must be {{model: PATH, parameters: {{…}}}}, not {entry!r}")
        inputs.append(_reference(entry["model"], f"models[{i}]"))
        settings.append(_parameters(entry.get("parameters"), method, f"models[{i}] parameters", per_source=True))
    base = None
    if config.get("base_model") is not None:
        base_ref = _reference(config["base_model"], "base_model")
        if base_ref not in inputs:  # mergekit adds it to the inputs
            inputs.append(base_ref)
            settings.append({})
        if method.base != "input":
            base = inputs.index(base_ref)
    elif method.base == "required":
        raise UsageError(f"{name} needs base_model")
    if len(set(inputs)) != len(inputs):
        raise UsageError(f"a model is listed twice: {sorted({m for m in inputs if inputs.count(m) > 1})}")
    shared = _parameters(config.get("parameters"), method, "parameters", per_source=False)
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and config[key] not in DTYPES:
            raise UsageError(f"{key} {config[key]!r} is not one of {', '.join(DTYPES)}")
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
        raise UsageError(f"{what} must be a mapping, not {params!r}")
    allowed = set(method.per_source) | (set() if per_source else set(method.shared))
    for key in params:
        if key not in allowed:
            where = "per model" if per_source and key in method.shared else "here"
            raise UsageError(f"{what}: {method.name} has no parameter {key!r} {where} (it takes "
                             f"{', '.join(sorted(allowed)) or 'none'})")
    return dict(params)
