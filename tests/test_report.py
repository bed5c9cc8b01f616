"""preftune report: PNG plots, a self-contained HTML page, a summary table, run comparison."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from preftune import run
from preftune.cli import app
from preftune.report import load_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_of_one_run(make_config: Any, tmp_path: Path) -> None:
    config = make_config(epochs=2, eval_interval=3)
    run(config)
    result = CliRunner().invoke(app, ["report", config.log_path])
    assert result.exit_code == 0, result.output
    logs = Path(config.log_path)
    for stem in ("loss", "margin", "accuracy", "rewards", "eval_accuracy"):
        assert (logs / f"{stem}.png").read_bytes().startswith(PNG), stem
    assert not (logs / "log_odds_ratio.png").exists()  # a DPO run has no ORPO metric
    page = (logs / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert not re.search(r"(src|href)=['\"]https?:", page)  # self-contained
    lines = result.output.splitlines()
    assert lines[0].split() == ["run", "steps", "loss", "eval_loss", "eval_accuracy",
                                "eval_margin", "tokens_per_s"]
    assert lines[1].split()[:2] == ["logs", "10"]
    assert lines[-1] == f"report: {logs / 'report.html'}"


def test_report_compares_runs(make_config: Any, tmp_path: Path) -> None:
    a = make_config(log_path=str(tmp_path / "dpo_run"))
    b = make_config(log_path=str(tmp_path / "orpo_run"), loss="orpo")
    run(a), run(b)
    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["report", a.log_path, b.log_path, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "dpo_run" in result.output and "orpo_run" in result.output
    assert (out / "log_odds_ratio.png").exists() and (out / "margin.png").exists()
    assert "dpo_run, orpo_run" in (out / "report.html").read_text()


def test_report_of_a_directory_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_damaged_metrics_and_config_files_do_not_stop_the_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes(b'[1]\n{"step": 1, "loss": 0.6}\n\xff\xfe\n{"step": 2')
    (run_dir / "config.json").write_text('{"beta":')
    run = load_run(run_dir)
    assert [row["step"] for row in run.train] == [1] and run.config == {}


def test_report_shows_the_samples_of_the_first_and_last_evaluations(make_config: Any) -> None:
    import html
    import json

    config = make_config(epochs=2, eval_interval=2, eval_samples=2, eval_sample_tokens=4)
    run(config)  # evaluations at steps 0, 2, 4, 6, 8, 10: the page shows four of them
    result = CliRunner().invoke(app, ["report", config.log_path])
    assert result.exit_code == 0, result.output
    page = (Path(config.log_path) / "report.html").read_text()
    samples = [json.loads(line)
               for line in (Path(config.log_path) / "samples.jsonl").read_text().splitlines()]
    table = page[page.index("<h2>Samples: logs</h2>"):]
    table = table[:table.index("</table>")]
    heads = re.findall(r"<th>(.*?)</th>", table)
    assert heads == ["prompt", "chosen", "step 0", "step 4", "step 6", "step 10"]
    cells = re.findall(r"<td>(.*?)</td>", table, re.S)
    assert len(cells) == 2 * 6
    first = [r for r in samples if r["index"] == samples[0]["index"]]
    assert cells[0] == html.escape(first[0]["prompt"]) and cells[1] == html.escape(first[0]["chosen"])
    assert cells[2] == html.escape(first[0]["completion"])  # step 0
    assert cells[5] == html.escape(first[-1]["completion"]) and first[-1]["step"] == 10
