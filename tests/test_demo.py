"""`preftune demo`: DPO on the embedded tiny model, offline, reaches >= 0.9 held-out accuracy."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


def test_demo_learns_the_preference_and_writes_a_report(demo_run: SimpleNamespace) -> None:
    assert demo_run.returncode == 0, demo_run.stderr
    lines = {line.split()[0]: line.split() for line in demo_run.stdout.splitlines() if line.strip()}
    before, after = float(lines["accuracy"][1]), float(lines["accuracy"][3])
    margin_before, margin_after = float(lines["margin"][1]), float(lines["margin"][3])
    assert before == 0.0 and after >= 0.9
    assert margin_after > margin_before + 1
    log_path = demo_run.log_path
    evals = [json.loads(x) for x in (log_path / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["eval_accuracy"] == pytest.approx(after, abs=5e-4)  # printed to 3 places
    assert (log_path / "report.html").exists()
    assert (log_path / "final" / "model.safetensors").exists()
