"""The preftune command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["plugins"], ["validate"], ["export"]])
def test_help_on_everything(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["plugins"], ["validate"], ["report"]])
def test_short_help_on_everything(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "-h"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"preftune {version('preftune')}"


def test_plugins_lists_components_with_their_distribution() -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)["components"]
    dpo = next(r for r in rows if r["name"] == "dpo")
    assert dpo == {"name": "dpo", "kind": "loss", "plugin": "preftune.plugins.dpo",
                   "distribution": "preftune", "version": dpo["version"]}
    table = runner.invoke(app, ["plugins"]).output
    assert "chosen_rejected" in table and "DISTRIBUTION" in table


def test_validate_reports_each_bad_line_and_exits_1(
    tmp_path: Path, pair_record: Any, write_jsonl: Any
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [pair_record("q", "a", "b"), "{oops",
                                              pair_record("q", "same", "same")])
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: malformed JSON" in result.output
    expected = f"{path}:3: field 'rejected.messages': chosen and rejected responses are identical"
    assert expected in result.output
    assert result.output.strip().endswith("3 records, 1 ok, 2 bad")


def test_validate_good_file_with_tokenizer_notes_truncation(
    tmp_path: Path, pair_record: Any, write_jsonl: Any
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [pair_record("q", "a " * 50, "b")])
    result = runner.invoke(app, ["validate", str(path), "--tokenizer", "builtin:tiny",
                                 "--max-seq-len", "20"])
    assert result.exit_code == 0, result.output
    assert "1 pair(s) truncated" in result.output and "1 ok, 0 bad" in result.output


def test_validate_unknown_format_lists_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n")
    result = runner.invoke(app, ["validate", str(path), "--format", "sharegpt"])
    assert result.exit_code == 2
    assert "unknown format 'sharegpt'; known formats: chosen_rejected, input_output" in result.output


def test_run_with_overrides_trains_and_prints_the_summary(
    tmp_path: Path, small_dataset: Any
) -> None:
    data = small_dataset(tmp_path / "d.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: builtin:tiny\ndataset: {data}\nlog_path: {tmp_path / 'logs'}\n"
                      "max_seq_len: 64\nsinks: [jsonl]\nepochs: 5\n")
    result = runner.invoke(app, ["run", str(config), "--set", "epochs=1", "--set", "batch_size=8"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["status"] == "completed" and summary["steps"] == 3  # 23 train pairs / 8


def test_a_completed_run_with_an_error_after_training_prints_both_and_exits_1(
    tmp_path: Path, small_dataset: Any, monkeypatch: Any
) -> None:
    """A backend's ``errors`` (a promote that failed after the weights were saved): the summary
    says completed, each error follows on stderr, and the exit status says something failed."""
    import preftune.loop

    real = preftune.loop.run

    def with_error(config: Any) -> dict[str, Any]:
        return {**real(config), "errors": ["promoting the final weights to model m failed: HTTP 409"]}

    monkeypatch.setattr(preftune.loop, "run", with_error)
    data = small_dataset(tmp_path / "d.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"base_model: builtin:tiny\ndataset: {data}\nlog_path: {tmp_path / 'logs'}\n"
                      "max_seq_len: 64\nsinks: [jsonl]\n")
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "completed"
    assert "error: promoting the final weights to model m failed: HTTP 409" in result.stderr
    assert (tmp_path / "logs" / "final").is_dir()


def test_run_with_a_bad_config_prints_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\nlosss = "dpo"\n')
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert "error: unknown config key 'losss' (did you mean 'loss'?)" in result.output
    assert "Traceback" not in result.output


def test_console_script_is_installed() -> None:
    """``preftune`` on PATH is the same app (checks the [project.scripts] entry point)."""
    exe = Path(sys.executable).parent / "preftune"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "validate" in out.stdout


def test_export_merge_of_a_finished_lora_run_is_its_merged_final(make_config: Any, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from preftune import run

    config = make_config(lora_rank=4, learning_rate=2e-2, epochs=1, local={"merge_lora": True})
    run(config)
    log_path, out = Path(config.log_path), tmp_path / "exported"
    result = runner.invoke(app, ["export", str(log_path), str(out), "--merge"])
    assert result.exit_code == 0, result.output
    assert f"merged model: {out}" in result.output
    merged = log_path / "final" / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in merged.iterdir())
    exported = load_file(str(out / "model.safetensors"))
    expected = load_file(str(merged / "model.safetensors"))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]  # no temporary left
    # the output exists now; a run whose base model is gone
    again = runner.invoke(app, ["export", str(log_path), str(out), "--merge"])
    assert again.exit_code == 2 and f"error: output directory {out} exists and is not empty" in again.output
    saved = json.loads((log_path / "config.json").read_text())
    (log_path / "config.json").write_text(json.dumps({**saved, "base_model": str(tmp_path / "gone")}))
    gone = runner.invoke(app, ["export", str(log_path), str(tmp_path / "other"), "--merge"])
    assert gone.exit_code == 2 and "error: the run's base model: " in gone.output
    assert f"{tmp_path / 'gone'}" in gone.output and len(gone.output.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


def fake_run(path: Path, final_files: dict[str, str] | None) -> Path:
    """A run directory as a run leaves it: config.json, and final/ holding ``final_files``."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"base_model": "builtin:tiny", "dataset": "d.jsonl"}))
    if final_files is not None:
        (path / "final").mkdir()
        for name, text in final_files.items():
            (path / "final" / name).write_text(text)
    return path


@pytest.mark.parametrize("case", ["no config", "no final", "full fine-tune", "no --merge", "out is a file"])
def test_export_bad_inputs_are_one_line_errors(tmp_path: Path, case: str) -> None:
    run_dir = tmp_path / "run"
    out = tmp_path / "out"
    args = ["export", str(run_dir), str(out), "--merge"]
    expected = {
        "no config": f"error: {run_dir} is not a preftune run directory: it has no config.json",
        "no final": f"error: {run_dir / 'final'}: no such directory; export reads a finished run's",
        "full fine-tune": f"error: {run_dir / 'final'} holds no LoRA adapter (adapter_config.json)",
        "no --merge": "error: export needs --merge",
        "out is a file": f"error: output {out} is a file",
    }[case]
    if case == "no config":
        run_dir.mkdir()
    else:
        fake_run(run_dir, None if case == "no final" else {"config.json": "{}"})
    if case == "no --merge":
        args.remove("--merge")
    if case == "out is a file":
        out.write_text("x")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.startswith(expected), result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_validate_with_a_run_config_reads_its_data_as_the_run_would(
    tmp_path: Path, small_dataset: Any, pair_record: Any, write_jsonl: Any
) -> None:
    """``validate --config``: both data sets, the run's tokenizer and max_seq_len; what it lists
    is what ``run`` refuses."""
    from preftune import DataError, load_config, run

    held = [pair_record(f"Held {i}?", f"Yes {i}.", f"No {i}.") for i in range(4)]
    held[2]["chosen"]["messages"][-1]["content"] = "Yes<|im_end|>"  # a control token: tokenizing finds it
    write_jsonl(tmp_path / "held.jsonl", held)
    data = small_dataset(tmp_path / "train.jsonl", n=12)
    config = tmp_path / "run.toml"
    config.write_text(f'base_model = "builtin:tiny"\ndataset = "{data}"\n'
                      f'eval_dataset = "{tmp_path / "held.jsonl"}"\nlog_path = "{tmp_path / "logs"}"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\nmax_seq_len = 64\n')
    result = runner.invoke(app, ["validate", "--config", str(config)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == (f"{tmp_path / 'held.jsonl'}:3: field 'chosen': message 0 contains the "
                        "tokenizer's control token '<|im_end|>'; as text it would end or start a turn")
    assert lines[-1] == f"{data} and {tmp_path / 'held.jsonl'}: 16 records, 15 ok, 1 bad"
    with pytest.raises(DataError) as refused:
        run(load_config(config))
    assert [str(p.where) for p in refused.value.problems] == [f"{tmp_path / 'held.jsonl'}:3"]
    both = runner.invoke(app, ["validate", str(data), "--config", str(config)])
    assert both.exit_code == 2 and "give a data set or --config, not both" in both.output
