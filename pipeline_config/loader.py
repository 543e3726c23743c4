"""Reading presets and `--set key=value` overrides into a validated `PipelineConfig`.

A preset is a YAML file in `pipeline_config/presets/` (or any path); it may name another preset in `extends:` and
override parts of it. Validation happens here, before any stage runs, and every error names the offending key, the
file (or `--set`) it came from and, where the schema has a closed set, the allowed values.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_config.schema import PipelineConfig

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration the user wrote is wrong; the message says where and how to fix it."""


def preset_path(preset: str | Path) -> Path:
    candidate = Path(preset)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}")
        return candidate
    named = PRESETS_DIR / f"{preset}.yaml"
    if not named.is_file():
        available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{preset}' (available: {', '.join(available)})")
    return named


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key written twice in one mapping. PyYAML keeps the last silently, so a second
    `train:` block would drop every setting of the first without a word. Merge keys (`<<: *base`) still override."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
        first: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first[key] + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass: safe)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (its own message spans several, with a caret drawing)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of stage names to settings")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The merged mapping, plus for each top-level dotted key the file that last set it (for error messages)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    origins: dict[str, Path] = {}
    base: dict[str, Any] = {}
    if parent is not None:
        base, origins = _load_with_extends(_extended(parent, path), (*seen, path.resolve()))
    for dotted in _dotted_keys(data):
        origins[dotted] = path
    return _merge(base, data), origins


def _extended(parent: Any, path: Path) -> Path:
    """What `path` extends: a preset's name, or a YAML file beside `path` (a team keeps its presets together and runs
    them from anywhere), else one relative to the working directory (the only place looked at before)."""
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: extends: name a preset or a .yaml file, not {parent!r}")
    if Path(parent).suffix not in {".yaml", ".yml"}:
        try:
            return preset_path(parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: extends: {exc}") from None
    for candidate in (path.parent / parent, Path(parent)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: extends: no such file {path.parent / parent}")


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=300` -> (["train", "max_steps"], 300); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.max_steps=300")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {_yaml_problem(exc)}") from exc
    return parts, value


_KEY = re.compile(r"[A-Za-z_][\w.-]*=")


def split_overrides(text: str) -> list[str]:
    """`make run SET="..."`: several KEY=VALUE overrides in one string, split into words as a shell splits them
    (quotes keep a value whole); a word that does not start with KEY= continues the value before it, so that
    `evaluate.prompts=[Once upon a time, The dog]` needs no quotes."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--sets (make's SET) {text!r}: {exc}") from None
    overrides: list[str] = []
    for word in words:
        if overrides and not _KEY.match(word):
            overrides[-1] += " " + word
        else:
            overrides.append(word)
    return overrides


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at the parent of `loc`, to suggest with an 'unknown key' error."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            inner = getattr(candidate, "__args__", None)
            for option in (candidate, *(inner or ())):
                if isinstance(option, type) and issubclass(option, BaseModel):
                    current = option
                    break
            else:
                continue
            break
        else:
            return []
    return sorted(getattr(current, "model_fields", {}))


def load_config(preset: str | Path = "quickstart", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    path = preset_path(preset)
    data, origins = _load_with_extends(path)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
        origins[".".join(parts)] = Path("--set")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, path)) from None


def _describe(exc: ValidationError, origins: dict[str, Path], path: Path) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(PipelineConfig, loc)
            message = f"unknown key '{loc[-1]}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif error["type"] == "literal_error":
            message = f"{message}; got {error.get('input')!r}"
        elif error["type"] == "value_error":  # our own validators' words, without pydantic's "Value error, "
            message = str(error.get("ctx", {}).get("error", message))
        if loc:
            lines.append(f"{_origin(loc, origins, path)}: {'.'.join(str(p) for p in loc)}: {message}")
        else:  # a check across sections: its message names the keys
            lines.append(f"{_named_origin(message, origins, path)}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _origin(loc: tuple[Any, ...], origins: dict[str, Path], path: Path) -> str:
    """The file (or --set) that set the key at `loc`; a model-level error blames an override inside it first."""
    dotted = ".".join(str(p) for p in loc if not isinstance(p, int))
    inside = [k for k in origins if k.startswith(dotted + ".") and origins[k] == Path("--set")]
    if inside:
        return "--set"
    return next((str(origins[k]) for k in _prefixes(loc) if k in origins), str(path))


def _named_origin(message: str, origins: dict[str, Path], path: Path) -> str:
    """Where the keys a check across sections names were written: --set if it wrote any of them (itself or a section
    above it, which a --set replaces whole), else the file of the first one a file wrote."""
    written = []
    for name in re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", message):
        parts = tuple(name.split("."))
        if any(origins.get(k) == Path("--set") for k in _prefixes(parts)):
            return "--set"
        written += [origins[name]] if name in origins else []
    return str(written[0]) if written else str(path)


def _prefixes(loc: tuple[Any, ...]) -> list[str]:
    """Longest first: 'train.model.n_head', 'train.model', 'train' (list indices skipped)."""
    names = [str(p) for p in loc if not isinstance(p, int)]
    return [".".join(names[:i]) for i in range(len(names), 0, -1)]
