"""Settings a run cannot use are refused by key, and the command line behaves (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import Config, ConfigError, get_plugin_manager, get_registry, hookimpl, load_config
from preftune.cli import app

runner = CliRunner()


@pytest.mark.parametrize("key", ["learning_rate", "beta", "eps", "max_grad_norm", "lora_alpha"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_for_every_float_setting(tmp_path: Path, key: str,
                                                                value: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'base_model = "builtin:tiny"\ndataset = "d.jsonl"\n{key} = {value}\n')
    with pytest.raises(ConfigError, match=rf"{key}'.*finite number"):
        load_config(config)
    with pytest.raises(ConfigError, match=rf"{key}'.*finite number"):
        load_config(None, ["base_model=builtin:tiny", "dataset=d.jsonl", f"{key}={value}"])


class FloatOptionsPlugin:
    """A third party's options model that forgot to refuse infinities."""

    @hookimpl
    def register_losses(self, register: Any) -> None:
        from pydantic import BaseModel

        class Options(BaseModel):
            weight: float = 1.0
            schedule: list[float] = [1.0]

        register("weighted", lambda config, options: None, Options)


@pytest.mark.parametrize("table", [{"weight": float("inf")}, {"schedule": [1.0, float("nan")]}])
def test_non_finite_plugin_options_are_refused_whatever_their_model(table: dict[str, Any]) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(FloatOptionsPlugin())
    config = Config(base_model="builtin:tiny", dataset="d", weighted=table)
    with pytest.raises(ConfigError, match=r"field 'weighted\.(weight|schedule\[1\])': must be a finite"):
        config.check_plugin_tables(get_registry(pm))
    with pytest.raises(ConfigError, match=r"field 'orpo.lambda': must be a finite number, got inf"):
        Config(base_model="builtin:tiny", dataset="d", orpo={"lambda": float("inf")}).check_plugin_tables(
            get_registry(pm))


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_validate_refuses_a_file_with_no_pairs_as_run_does(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}: the data set holds no preference pairs" in result.output


def test_validate_refuses_a_file_whose_every_pair_is_too_long_as_run_does(
    tmp_path: Path, pair_record: Any, write_jsonl: Any
) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [pair_record("a long question " * 20, "y", "n")] * 2)
    result = runner.invoke(app, ["validate", str(path), "--tokenizer", "builtin:tiny",
                                 "--max-seq-len", "16"])
    assert result.exit_code == 1
    assert "no pair fits max_seq_len=16" in result.output
    ok = runner.invoke(app, ["validate", str(path), "--tokenizer", "builtin:tiny"])
    assert ok.exit_code == 0 and "2 records, 2 ok, 0 bad" in ok.output


@pytest.mark.parametrize("key", ["log_path", "dataset", "eval_dataset", "base_model", "cache_dir"])
def test_an_empty_path_or_name_is_refused_not_read_as_here(key: str) -> None:
    settings = ["base_model=builtin:tiny", "dataset=d.jsonl", f'{key}=" "']
    with pytest.raises(ConfigError, match=rf"--set {key}=\" \": field '{key}': must not be empty"):
        load_config(None, settings)
