"""Settings that would void a run without a word are said once; a completed run is not resumed
into a changed one; small errors name what is wrong (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import ConfigError, run
from preftune.cli import app


def said(capfd: pytest.CaptureFixture[str]) -> list[str]:
    return [line.removeprefix("[preftune] ") for line in capfd.readouterr().err.splitlines()]


def test_a_warmup_longer_than_the_run_says_the_learning_rate_it_reaches(
        make_config: Any, capfd: pytest.CaptureFixture[str]) -> None:
    summary = run(make_config(warmup_steps=1000, learning_rate=1e-5, epochs=1, batch_size=6))
    steps = summary["steps"]
    notes = [line for line in said(capfd) if line.startswith("warmup_steps")]
    peak = 1e-5 * steps / 1000
    assert notes == [f"warmup_steps = 1000 is not below the run's {steps} optimizer steps: the learning "
                     f"rate peaks at {peak:.3g} at the last step, not at learning_rate = 1e-05; lower "
                     "warmup_steps to reach it"]
    metrics = Path(summary["weights"]).parent / "metrics.jsonl"
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(peak)


def test_a_warmup_shorter_than_the_run_says_nothing(make_config: Any,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    run(make_config(warmup_steps=2, epochs=1, batch_size=6))
    assert not [line for line in said(capfd) if line.startswith("warmup")]


def test_an_eval_fraction_that_holds_out_nothing_says_why(make_config: Any,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    summary = run(make_config(max_pairs=1, eval_fraction=0.05, eval_interval=1))
    assert summary["final_eval"] == {}
    lines = said(capfd)
    assert any(line.startswith("eval_fraction = 0.05 holds out no pair of ") and
               "one pair cannot be split into training and held-out pairs" in line for line in lines)
    assert "eval_interval = 1 is ignored: there are no held-out pairs" in lines


@pytest.mark.parametrize("pairs", [2, 3, 40])
def test_any_eval_fraction_above_zero_holds_out_a_pair_of_two_or_more(
        make_config: Any, pairs: int) -> None:
    summary = run(make_config(max_pairs=pairs, eval_fraction=0.001, epochs=1))
    assert summary["final_eval"] and summary["final_eval"]["eval_loss"] > 0


def test_settings_the_selected_plugins_ignore_are_said_once(
        make_config: Any, capfd: pytest.CaptureFixture[str]) -> None:
    run(make_config(loss="orpo", reference="separate", lora_alpha=8.0, keep_checkpoints=4,
                    wandb={"project": "p"}, epochs=1))
    lines = said(capfd)
    for note in ("reference = 'separate' is ignored: loss 'orpo' needs no reference model",
                 "lora_alpha is ignored: lora_rank = 0 asks for a full fine-tune",
                 "keep_checkpoints is ignored: checkpoint_interval = 0 writes no checkpoints"):
        assert lines.count(note) == 1, note
    assert sum(line.startswith("[wandb] is ignored: no selected plugin is named 'wandb'")
               for line in lines) == 1


def test_a_lora_rank_above_the_hidden_size_is_said(make_config: Any,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    run(make_config(lora_rank=100, epochs=1))  # the tiny model's hidden size is 64
    assert said(capfd).count("lora_rank = 100 is above the model's hidden size (64): a LoRA update has "
                             "rank at most 64, so the extra rank adds memory and no capacity") == 1


def test_resuming_a_completed_run_is_refused_and_changes_nothing(make_config: Any) -> None:
    config = make_config(checkpoint_interval=2, epochs=1)
    summary = run(config)
    log_path = Path(config.log_path)
    before = {p: p.read_bytes() for p in log_path.rglob("*") if p.is_file() and p.name != ".preftune.lock"}
    assert json.loads((log_path / "summary.json").read_text())["status"] == "completed"
    with pytest.raises(ConfigError, match=rf"log_path {log_path} holds a run that completed at step "
                                          rf"{summary['steps']} .*nothing to resume"):
        run(config.model_copy(update={"resume": True}))
    after = {p: p.read_bytes() for p in log_path.rglob("*") if p.is_file() and p.name != ".preftune.lock"}
    assert after == before


def test_a_new_run_on_the_log_path_of_a_completed_one_removes_its_summary_first(
        make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a later run, killed and resumed, would be refused as completed."""
    from preftune import loop

    config = make_config(epochs=1)
    run(config)
    summary = Path(config.log_path) / "summary.json"
    assert summary.exists()
    seen = []
    prepare = loop.prepare_data

    def watch(*args: Any) -> Any:
        seen.append(summary.exists())
        return prepare(*args)

    monkeypatch.setattr(loop, "prepare_data", watch)
    run(config)
    assert seen == [False] and json.loads(summary.read_text())["status"] == "completed"


def test_report_on_a_directory_that_does_not_exist_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = CliRunner().invoke(app, ["report", str(missing)])
    assert result.exit_code == 2
    assert result.stderr == f"error: {missing}: no such directory ({missing})\n"


def test_a_data_file_not_found_shows_the_absolute_path_tried(make_config: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"^dataset data/train.jsonl: No such file or directory \(tried "
                                          rf"{tmp_path}/data/train.jsonl: relative paths are relative "
                                          r"to the current directory\)$"):
        run(make_config(dataset="data/train.jsonl"))


def test_a_failed_run_says_so_in_its_summary_with_secrets_masked(
        make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from preftune import TrainingError, loop

    key = "tml-" + "Zq7Xk2Lm9Pw4Rt8Yv3Nb6Hc1"

    def fail(*args: Any) -> Any:
        raise TrainingError(f"the service said: bad key {key}")

    monkeypatch.setattr(loop, "resume_state", fail)
    config = make_config(epochs=1)
    with pytest.raises(TrainingError):
        run(config)
    summary = json.loads((Path(config.log_path) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("TrainingError: the service said")
    assert key not in summary["error"] and "tml-" in summary["error"]
