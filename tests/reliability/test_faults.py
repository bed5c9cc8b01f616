"""Faults end a run cleanly: non-finite weights, a second run on one log_path, signals (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import Config, ConfigError, TrainingError, get_plugin_manager, hookimpl, run
from preftune.plugins.local import LocalBackend, LocalOptions


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_weights_holding_nan_are_never_saved(tokenizer: Any, tmp_path: Path) -> None:
    b = LocalBackend(Config(base_model="builtin:tiny", dataset="unused", device="cpu"),
                     LocalOptions(), tokenizer)
    with torch.no_grad():
        b.model.model.norm.weight[3] = float("nan")
    for save in (b.save_weights, b.save_state):
        with pytest.raises(TrainingError, match="'model.norm.weight' holds NaN"):
            save(str(tmp_path / "out"))
    with pytest.raises(TrainingError, match="holds NaN"):
        b.publish_weights("s1", 1, "d", str(tmp_path / "deploy"), keep=2)
    assert list(tmp_path.iterdir()) == []


class Corrupter:
    """A sink that breaks the policy's weights after the last step (as an overflow would)."""

    backend: Any = None

    @hookimpl
    def preftune_run_start(self, config: Any, info: Any, backend: Any) -> None:
        self.backend, self.last = backend, info["total_steps"]

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.last:
            with torch.no_grad():
                next(self.backend.model.parameters()).fill_(float("inf"))


class CorrupterPlugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("corrupter", lambda config, options: Corrupter())


def test_a_run_whose_weights_are_not_finite_does_not_complete(make_config: Any) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(CorrupterPlugin())
    config = make_config(sinks=["jsonl", "corrupter"])
    with pytest.raises(TrainingError, match="holds NaN or infinite values; not saved"):
        run(config, pm)
    assert not (Path(config.log_path) / "final").exists()


def test_a_second_run_on_one_log_path_stops_naming_the_first_and_a_killed_ones_lock_is_taken(
    make_config: Any,
) -> None:
    config = make_config()
    log_path = Path(config.log_path)
    log_path.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from preftune.fileio import run_lock\n"
         f"with run_lock(Path({str(log_path)!r})):\n    print('locked', flush=True)\n"
         "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another preftune run \(PID {holder.pid}\)"):
            run(config)
        assert not (log_path / "config.json").exists()  # nothing of the first run's was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (log_path / ".preftune.lock").read_text().strip() == str(holder.pid)  # left behind
    assert run(config)["status"] == "completed"  # the dead run's lock is taken over
    assert run(config)["status"] == "completed"  # and released at the end of each run


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_the_resume_command(
    tmp_path: Path, small_dataset: Any, config_file: Any, signum: int, code: int
) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    config = config_file(tmp_path / "c.toml", data, tmp_path / "logs", tmp_path / "cache", epochs=400,
                         checkpoint_interval=1000)
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "run", str(config),
                             "--set", "seed=3"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(rows(metrics)) < 3):
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and out == ""
    [saved] = (tmp_path / "logs" / "checkpoints").iterdir()  # written at the stop, not the interval
    step = int(saved.name.split("-")[1])
    assert 3 <= step < 3600 and len(rows(metrics)) == step  # every finished step was logged
    assert f"after step {step}; checkpoint {saved}" in err
    assert f"resume with: preftune run {config} --set seed=3 --resume" in err
    assert not (tmp_path / "logs" / "final").exists()


def test_ctrl_c_before_training_starts_is_one_line_and_exit_130(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import preftune.loop
    from preftune.cli import app

    def interrupted(config: Any, pm: Any = None) -> Any:
        raise KeyboardInterrupt  # as Ctrl-C while tokenizing, or a second Ctrl-C

    monkeypatch.setattr(preftune.loop, "run", interrupted)
    config = tmp_path / "c.toml"
    config.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\n')
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted (Ctrl-C); nothing was trained past the last checkpoint"
