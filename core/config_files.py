"""Reading config files: TOML, YAML or JSON as plain data. No code is ever imported or executed.

A key given twice is an error naming the file, the line and the key in all three (PyYAML and
``json`` would keep the last value silently). YAML is read with the safe loader, plus YAML 1.2's
numbers: ``1e-5`` is a float, not the string PyYAML 1.1 makes of it. Errors name the file and line.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .data.jsonl import unique_keys
from .errors import ConfigError, RecordError

SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file into a dict."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml, .yml or .json")
    try:
        data = PARSERS[path.suffix](path, read_text(path))
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of settings")
    return data


def read_text(path: Path) -> str:
    """The file's text: UTF-8, a byte order mark skipped."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save the file as UTF-8") from None


def parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(toml_error(path, text, str(exc))) from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ConfigError(f"{path}: holds a number too long to read ({exc})") from None


def toml_error(path: Path, text: str, message: str) -> str:
    """``file:line: what``, the key named when it is set twice (tomllib says only 'Cannot
    overwrite a value')."""
    found = re.search(r"\s*\(at line (\d+), column \d+\)", message)
    lines = text.splitlines()
    if found is None or not 0 < int(found.group(1)) <= len(lines):
        return f"{path}: not valid TOML: {message}"
    number, line = int(found.group(1)), lines[int(found.group(1)) - 1].strip()
    if "overwrite" in message or "twice" in message:
        key = line.partition("=")[0].strip() if "=" in line else line.strip("[] ")
        return f"{path}:{number}: key {key!r} is set twice; which value is meant?"
    return f"{path}:{number}: not valid TOML: {message[: found.start()]}: {line!r}"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': explicit keys may override
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML refuses it itself
                continue
            if first is not None:
                where = f"on line {line}" if first == line else f"lines {first} and {line}"
                raise RefusedYaml(f"key {key!r} is given twice ({where}); which value is meant?",
                                       key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


class RefusedYaml(yaml.MarkedYAMLError):
    def __init__(self, problem: str, mark: Any):
        super().__init__(problem=problem, problem_mark=mark)


YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


MAX_VALUES = 100_000  # a config holds dozens; aliases of aliases (a "YAML bomb") hold billions


def expanded_size(value: Any, memo: dict[int, int]) -> int:
    """How many values ``value`` holds once every alias is written out (shared parts counted
    once per use, computed once each)."""
    if id(value) in memo:
        return memo[id(value)]
    parts = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    memo[id(value)] = size = 1 + sum(expanded_size(part, memo) for part in parts)
    return size


def parse_yaml(path: Path, text: str) -> Any:
    data = _load_yaml(path, text)
    if expanded_size(data, {}) > MAX_VALUES:
        raise ConfigError(f"{path}: its aliases (*name) expand to more than {MAX_VALUES:,} values; "
                          "a config is far smaller: write the values out")
    return data


def _load_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=ConfigLoader) or {}
    except RefusedYaml as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ConfigError(f"{path}: holds a number too long to read ({exc})") from None


def parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecordError as exc:
        raise ConfigError(f"{path}: key {exc.field!r} is given twice in one object; "
                          "which value is meant?") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ConfigError(f"{path}: holds a number too long to read ({exc})") from None


PARSERS = {".toml": parse_toml, ".yaml": parse_yaml, ".yml": parse_yaml, ".json": parse_json}
