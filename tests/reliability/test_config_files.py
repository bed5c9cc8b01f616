"""Settings are read strictly and every mistake names its file and line, or its --set (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import Config, ConfigError, load_config
from preftune.cli import app

REQUIRED = 'base_model = "builtin:tiny"\ndataset = "d.jsonl"\n'


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(REQUIRED + text)
    return path


def yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("base_model: builtin:tiny\ndataset: d.jsonl\n" + text)
    return path


@pytest.mark.parametrize("key, value, shown", [
    ("batch_size", "true", "Input should be a valid integer, got true"),
    ("batch_size", '"4"', 'Input should be a valid integer, got "4"'),
    ("epochs", "2.5", "Input should be a valid integer, got 2.5"),
    ("epochs", "2.0", "Input should be a valid integer, got 2.0"),
    ("resume", "1", "Input should be a valid boolean, got 1"),
    ("base_model_revision", "1234", "Input should be a valid string, got 1234"),
])
def test_strict_types_in_a_file_and_in_set_name_the_key(tmp_path: Path, key: str, value: str,
                                                         shown: str) -> None:
    path = toml(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: field '{key}': {shown}$"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^--set {key}={value}: field '{key}': {shown}"):
        load_config(toml(tmp_path, ""), [f"{key}={value}"])


def test_an_int_is_still_a_float_and_yaml_reads_1e_5_as_a_number(tmp_path: Path) -> None:
    assert load_config(toml(tmp_path, "learning_rate = 1\nbeta = 2\n")).learning_rate == 1.0
    assert load_config(yaml(tmp_path, "learning_rate: 1e-5\nbeta: 5E+1\n")).learning_rate == 1e-5
    assert load_config(toml(tmp_path, ""), ["learning_rate=3", "epochs=2"]).learning_rate == 3.0
    with pytest.raises(ConfigError, match=r"field 'learning_rate': Input should be a valid number, "
                                          r'got "1e-5"'):
        load_config(yaml(tmp_path, 'learning_rate: "1e-5"\n'))  # quoted: text, not a number


def test_plugin_tables_are_strict_too_and_name_the_set(tmp_path: Path, registry: Any) -> None:
    config = load_config(toml(tmp_path, "[console]\ninterval = true\n"))
    with pytest.raises(ConfigError, match=r"^field 'console.interval': Input should be a valid integer, "
                                          r"got true"):
        config.check_plugin_tables(registry)
    config = load_config(toml(tmp_path, ""), ["local.threads=2.5"])
    with pytest.raises(ConfigError, match=r"^--set local.threads=2.5: field 'local.threads': Input should "
                                          r"be a valid integer, got 2.5"):
        config.check_plugin_tables(registry)


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "base_model: builtin:tiny\nbatch_size: 4\ndataset: d\nbatch_size: 8\n",
     r"c\.yaml:4: key 'batch_size' is given twice \(lines 2 and 4\); which value is meant\?"),
    ("c.yaml", "base_model: builtin:tiny\ndataset: d\nlocal: {dtype: float32, dtype: bfloat16}\n",
     r"c\.yaml:3: key 'dtype' is given twice \(on line 3\)"),
    ("c.toml", 'base_model = "builtin:tiny"\nbatch_size = 4\ndataset = "d"\nbatch_size = 8\n',
     r"c\.toml:4: key 'batch_size' is set twice; which value is meant\?"),
    ("c.toml", '[local]\ndtype = "float32"\n[local]\n', r"c\.toml:3: key 'local' is set twice"),
    ("c.json", '{"base_model": "builtin:tiny", "seed": 1, "seed": 2}',
     r"c\.json: key 'seed' is given twice in one object"),
])
def test_a_key_given_twice_is_an_error_naming_file_line_and_key(tmp_path: Path, name: str, text: str,
                                                                message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    config = load_config(yaml(tmp_path, "defaults: &d {interval: 5, progress: false}\n"
                                        "console:\n  <<: *d\n  interval: 2\n"))
    assert config.plugin_tables()["console"] == {"interval": 2, "progress": False}


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(REQUIRED.encode() + b'log_path = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"c\.toml:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbf" + REQUIRED.encode())  # a byte order mark is fine
    assert load_config(path).base_model == "builtin:tiny"


@pytest.mark.parametrize("given, hint", [
    ("dtype=bfloat16", "did you mean --set local.dtype=bfloat16?"),
    ("learning_rat=1e-3", "did you mean --set learning_rate=1e-3?"),
    ("local.dtyp=bfloat16", "did you mean --set local.dtype=bfloat16?"),
    ("console.intervall=3", "did you mean --set console.interval=3?"),
])
def test_an_unknown_set_key_suggests_the_right_set_spelling(tmp_path: Path, registry: Any, given: str,
                                                            hint: str) -> None:
    config = load_config(toml(tmp_path, ""), [given])
    with pytest.raises(ConfigError) as info:
        config.check_plugin_tables(registry)
    assert str(info.value).startswith(f"--set {given}: unknown") and hint in str(info.value)


def test_an_unknown_key_in_a_file_points_to_its_table(tmp_path: Path, registry: Any) -> None:
    config = load_config(toml(tmp_path, 'dtype = "bfloat16"\n'))
    with pytest.raises(ConfigError, match=r"^unknown config key 'dtype' \(did you mean 'dtype' in the "
                                          r"\[local\] table\?\)"):
        config.check_plugin_tables(registry)


def test_a_set_value_that_toml_reads_as_a_number_gets_a_quoting_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, ""), ["base_model_revision=20240101"])
    assert str(info.value).endswith("""(--set reads the value as TOML; for text, quote it: """
                                    """--set 'base_model_revision="20240101"')""")
    quoted = load_config(toml(tmp_path, ""), ['base_model_revision="20240101"'])
    assert quoted.base_model_revision == "20240101"


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_out_of_torchs_range_are_refused(tmp_path: Path, seed: str) -> None:
    with pytest.raises(ConfigError, match=r"field 'seed': Input should be (greater|less) than or equal to"):
        load_config(toml(tmp_path, f"seed = {seed}\n"))
    assert load_config(toml(tmp_path, f"seed = {2**64 - 1}\n")).seed == 2**64 - 1


def test_a_seed_at_the_top_of_the_range_orders_every_epoch(tmp_path: Path) -> None:
    from preftune.data import epoch_order, split_eval

    top = 2**64 - 1
    assert sorted(epoch_order(10, top, 3)) == list(range(10)) and split_eval(10, 0.2, top)[1]
    assert epoch_order(10, 7, 2) == epoch_order(10, 7, 2) != epoch_order(10, 8, 2)


def test_run_help_lists_every_setting() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=100)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    missing = [key for key in Config.model_fields if key not in text]
    assert not missing and "--set local.precision=bf16-mixed" in text and "docs/config.md" in text


def test_an_error_is_one_message_without_a_traceback(tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "d.jsonl", n=4)
    path = tmp_path / "c.toml"
    common = (f'base_model = "builtin:tiny"\ndataset = "{data}"\nlog_path = "{tmp_path / "logs"}"\n'
              f'cache_dir = "{tmp_path / "cache"}"\neval_fraction = 0\n')
    path.write_text(common + "max_seq_len = true\n")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and result.stderr == (
        f"error: {path}: field 'max_seq_len': Input should be a valid integer, got true\n")
    diverging = "max_seq_len = 64\nlearning_rate = 1e30\nepochs = 3\n[console]\nprogress = false\n"
    path.write_text(common + diverging)
    result = CliRunner().invoke(app, ["run", str(path)])  # fails in training, with sinks open
    errors = [line for line in result.stderr.splitlines() if "gradient norm is nan" in line]
    assert result.exit_code == 2 and len(errors) == 1
    assert errors[0].startswith("error: gradient norm is nan at step 2; the step was not applied; pairs: ")
    assert "Traceback" not in result.stderr and "run failed" in result.stderr


def test_a_date_in_a_file_is_its_text_and_types_stay_strict(tmp_path: Path) -> None:
    config = load_config(yaml(tmp_path, "wandb: {run_name: 2024-01-01}\n"), ["seed=3"])
    assert config.plugin_tables()["wandb"] == {"run_name": "2024-01-01"}  # no traceback from --set
    with pytest.raises(ConfigError, match=r"field 'batch_size': Input should be a valid integer, got true"):
        load_config(yaml(tmp_path, "batch_size: true\nwandb: {run_name: 2024-01-01}\n"))


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in "bcdefghi":  # each level nine times the last: 9**9 values written out
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("base_model: builtin:tiny\ndataset: d.jsonl\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: its aliases \(\*name\) expand to more than"):
        load_config(path)
