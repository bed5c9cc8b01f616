"""`preftune demo`: DPO on the embedded tiny model, offline, reaches >= 0.9 held-out accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from preftune.cli import app


def test_demo_learns_the_preference_and_writes_a_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--log-path", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    before, after = float(lines["accuracy"][1]), float(lines["accuracy"][3])
    margin_before, margin_after = float(lines["margin"][1]), float(lines["margin"][3])
    assert before == 0.0 and after >= 0.9
    assert margin_after > margin_before + 1
    evals = [json.loads(x) for x in (tmp_path / "demo" / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["eval_accuracy"] == pytest.approx(after, abs=5e-4)  # printed to 3 places
    assert (tmp_path / "demo" / "report.html").exists()
    assert (tmp_path / "demo" / "final" / "model.safetensors").exists()
