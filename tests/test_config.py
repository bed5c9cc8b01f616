"""Config files, overrides, plugin option tables, and the docs that describe them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from preftune import Config, ConfigError, get_plugin_manager, get_registry, hookimpl, load_config
from preftune.config import config_fields


def test_toml_and_yaml_give_the_same_config(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\nbeta = 0.2\n'
                    'sinks = ["jsonl"]\n[console]\ninterval = 5\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("base_model: builtin:tiny\ndataset: d.jsonl\nbeta: 0.2\nsinks: [jsonl]\n"
                    "console:\n  interval: 5\n")
    assert load_config(toml).model_dump() == load_config(yaml).model_dump()
    assert (load_config(toml).source_file, load_config(yaml).source_file) == (str(toml), str(yaml))
    assert load_config(toml).beta == 0.2
    assert load_config(toml).plugin_tables() == {"console": {"interval": 5}}


def test_set_overrides_parse_values_and_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\n')
    config = load_config(path, ["learning_rate=1e-4", "epochs=3", "loss=dpo",
                                "sinks=[\"console\"]", "console.interval=2"])
    assert config.learning_rate == 1e-4 and config.epochs == 3 and config.loss == "dpo"
    assert config.sinks == ["console"] and config.plugin_tables()["console"] == {"interval": 2}
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["epochs"])


def test_bad_values_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\nbeta = -1\n')
    with pytest.raises(ConfigError, match=r"c\.toml: field 'beta': Input should be greater than 0"):
        load_config(path)
    path.write_text('dataset = "d.jsonl"\n')
    with pytest.raises(ConfigError, match="field 'base_model': Field required"):
        load_config(path)
    path.write_text("base_model = \n")
    with pytest.raises(ConfigError, match=r"c\.toml:1: not valid TOML: Invalid value: .base_model =."):
        load_config(path)
    with pytest.raises(ConfigError, match="must end in .toml"):
        load_config(tmp_path / "c.ini")


def test_unknown_keys_are_errors_listing_known_ones(registry: Any) -> None:
    config = Config(base_model="builtin:tiny", dataset="d", learning_rat=1e-3)
    with pytest.raises(ConfigError) as info:
        config.check_plugin_tables(registry)
    message = str(info.value)
    assert "unknown config key 'learning_rat'" in message
    assert "did you mean 'learning_rate'" in message and "known keys:" in message
    tables = message.split("plugin option tables: ")[1].split(", ")
    assert tables == sorted(tables) and {"console", "fireworks", "local", "orpo", "simpo"} <= set(tables)


def test_plugin_tables_are_validated_by_the_plugins_model(registry: Any) -> None:
    good = Config(base_model="builtin:tiny", dataset="d", console={"interval": 3})
    assert good.check_plugin_tables(registry)["console"].interval == 3
    bad = Config(base_model="builtin:tiny", dataset="d", console={"intervall": 3})
    with pytest.raises(ConfigError, match="unknown key 'console.intervall'"):
        bad.check_plugin_tables(registry)
    wrong_type = Config(base_model="builtin:tiny", dataset="d", local={"dtype": "int8"})
    with pytest.raises(ConfigError, match="field 'local.dtype'"):
        wrong_type.check_plugin_tables(registry)


def test_redacted_config_masks_secrets(registry: Any) -> None:
    from pydantic import BaseModel, SecretStr


    class Options(BaseModel):
        api_key: SecretStr

    class Plugin:
        @hookimpl
        def register_sinks(self, register: Any) -> None:
            register("remote", lambda config, options: object(), Options)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin())
    config = Config(base_model="builtin:tiny", dataset="d", remote={"api_key": "sk-secret-123"})
    text = str(config.redacted(get_registry(pm)))
    assert "sk-secret-123" not in text and "**" in text


DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def doc_rows() -> dict[str | None, dict[str, tuple[str, str]]]:
    """Documented rows per table (``None``: the top-level fields), each ``(type, default)``."""
    tables: dict[str | None, dict[str, tuple[str, str]]] = {None: {}}
    table = None
    for line in DOCS.read_text().splitlines():
        heading = re.match(r"^### `\[(\w+)\]`", line)
        if heading:
            table = heading.group(1)
            tables[table] = {}
        match = re.match(r"^\| `(\w+)` \| `([^`]*)` \| `?([^`|]*)`? \|", line)
        if match:
            tables[table][match.group(1)] = (match.group(2), match.group(3).strip())
    return tables


def test_docs_list_every_config_field_with_type_and_default() -> None:
    rows = doc_rows()[None]
    fields = config_fields()
    assert set(fields) <= set(rows), f"undocumented: {set(fields) - set(rows)}"
    for name, (type_name, default, _) in fields.items():
        assert rows[name][0] == type_name, name
        assert rows[name][1] == ("required" if default == "required" else repr(default)), name


def test_docs_list_every_builtin_plugin_option(registry: Any) -> None:
    tables = doc_rows()
    for component in registry.all():
        if component.options is None:
            continue
        rows = tables.get(component.name, {})
        for name, info in component.options.model_fields.items():
            key = info.alias or name  # what users write in the table
            assert key in rows, f"[{component.name}] {key} is not documented"
            assert rows[key][1] == repr(info.default), f"[{component.name}] {key}"
