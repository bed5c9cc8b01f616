"""What a user reads: progress output without control characters in a pipe, and
docs/quickstart.md quoting what the demo and ``validate`` print today (issue 15)."""

from __future__ import annotations

import io
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from preftune import Config
from preftune.cli import app
from preftune.plugins.console import ConsoleOptions, ConsoleSink
from preftune.signals import Stopped

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart.md"
NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"


def block_after(marker: str) -> list[str]:
    """The lines of the first fenced block after ``marker`` in the quickstart."""
    text = DOC.read_text()
    start = text.index("```", text.index(marker))
    body = text[text.index("\n", start) + 1 : text.index("```", start + 3)]
    return body.splitlines()


def shape(line: str) -> re.Pattern[str]:
    """A doc line as a pattern: ``...`` stands for anything, a number for any number, and spaces
    that align columns for any run of spaces."""
    parts = re.split(rf"(\.\.\.|{NUMBER}| +)", line)
    return re.compile("".join(".*" if p == "..." else NUMBER if re.fullmatch(NUMBER, p)
                              else " +" if p.isspace() else re.escape(p) for p in parts))


def assert_quoted_in_order(doc_lines: list[str], output: str) -> None:
    lines = iter(output.splitlines())
    for quoted in doc_lines:
        pattern = shape(quoted)
        assert any(pattern.fullmatch(line.rstrip()) for line in lines), f"not printed: {quoted!r}"


def test_progress_in_a_pipe_has_no_bar_carriage_return_or_escape(demo_run: SimpleNamespace) -> None:
    assert demo_run.returncode == 0, demo_run.stderr
    for stream in (demo_run.stdout, demo_run.stderr):
        assert "\r" not in stream and "\x1b" not in stream and "█" not in stream
    assert "step 300: loss=" in demo_run.stderr and "eval @ step 300:" in demo_run.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, drawn", [(Terminal, True), (io.StringIO, False)],
                         ids=["terminal", "pipe"])
def test_the_console_sink_draws_a_bar_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO], drawn: bool
) -> None:
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    sink = ConsoleSink(ConsoleOptions(interval=2))
    info = {"train_pairs": 8, "eval_pairs": 2, "total_steps": 4, "resume_step": 0}
    sink.preftune_run_start(Config(base_model="builtin:tiny", dataset="d"), info, None)
    for step in range(1, 5):
        sink.preftune_log_metrics(step, {"loss": 0.5, "accuracy": 1.0})
    sink.preftune_run_end({"status": "completed", "steps": 4})
    text = err.getvalue()
    assert ("\r" in text and "train: 100%" in text) is drawn
    assert "step 4: loss=0.5  accuracy=1" in text.splitlines()


def test_the_quickstart_quotes_what_the_demo_prints_and_writes(demo_run: SimpleNamespace) -> None:
    assert_quoted_in_order(block_after("When training ends, the demo prints"), demo_run.stdout)
    assert_quoted_in_order(block_after("In a pipe or a\nlog file"), demo_run.stderr)
    text = DOC.read_text()
    listing = text[text.index("The demo writes these files"):text.index("`--set key=value` works")]
    names = re.findall(r"^- `([^`]+)`", listing, flags=re.M)
    assert len(names) >= 5
    for name in names:
        assert (demo_run.log_path / name).exists(), name


def test_the_quickstart_quotes_what_validate_prints(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.jsonl").write_text("\n".join(block_after("For this `bad.jsonl`")) + "\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", "bad.jsonl"])
    assert result.exit_code == 1
    assert result.output.splitlines() == block_after("`preftune validate bad.jsonl` prints:")


def test_the_quickstart_quotes_the_stop_message() -> None:
    stopped, resume = block_after("ends every sink and frees the model, then prints")
    step = int(stopped.split("after step ")[1].split(";")[0])
    checkpoint = Path(stopped.split("checkpoint ")[1])
    assert str(Stopped(signal.SIGTERM, step, checkpoint)) == stopped
    assert resume == "resume with: preftune run config.toml --resume"
