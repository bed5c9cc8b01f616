"""Resuming a ``fireworks`` run that stopped or failed, through the real SDK clients against the
emulator: with ``[fireworks] keep_job_on_interrupt`` the job holding the newest checkpoint's state
is kept, ``--resume`` continues from it to the uninterrupted run's losses and deletes it; without
it the job is deleted and neither the command line nor a resume promises what cannot work."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from preftune import ConfigError, TrainingError, run
from preftune.config import load_config


def losses(log_path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def policy_jobs(emulator: Any) -> list[str]:
    return [j for j, job in emulator.emulator.jobs.items() if not job["forward_only"]]


def ledger(log_path: Path) -> list[str]:
    return json.loads((log_path / "fireworks_jobs.json").read_text())


def config_on(config_file: Any, tmp_path: Path, name: str, url: str, keep: bool,
              checkpoint_interval: int = 3) -> Path:
    """A LoRA fireworks run on the emulator, as a TOML file (``tmp_path/name.toml``)."""
    config = config_file(tmp_path / f"{name}.toml", tmp_path / "d.jsonl", tmp_path / name,
                         tmp_path / "cache", epochs=2, checkpoint_interval=checkpoint_interval)
    with open(config, "a") as f:
        f.write(f'backend = "fireworks"\nlora_rank = 4\n[fireworks]\nbase_url = "{url}"\n'
                f"poll_interval_s = 0.05\nkeep_job_on_interrupt = {str(keep).lower()}\n")
    return config


@pytest.fixture
def configs(tmp_path: Path, small_dataset: Any, config_file: Any, emulator: Any) -> Any:
    small_dataset(tmp_path / "d.jsonl")
    return lambda name, keep, **kw: config_on(config_file, tmp_path, name, emulator.url, keep, **kw)


def test_sigterm_keeps_the_job_and_resume_continues_from_it_to_the_same_losses(
        emulator: Any, tmp_path: Path, configs: Any, start_run: Any, wait_for_rows: Any,
        capfd: pytest.CaptureFixture[str]) -> None:
    run(load_config(configs("full", keep=True)))  # the uninterrupted run's numbers
    assert emulator.emulator.leftovers() == []
    config = configs("stopped", keep=True)
    proc = start_run(config)
    wait_for_rows(tmp_path / "stopped" / "metrics.jsonl", 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stderr = proc.stderr.read()
    [kept] = [j for j in policy_jobs(emulator) if j in ledger(tmp_path / "stopped")]
    assert f"trainer job {kept} is kept (keep_job_on_interrupt)" in stderr
    assert "costs money until it is deleted" in stderr
    assert f"resume with: preftune run {config} --resume" in stderr and "no resume" not in stderr
    assert emulator.emulator.leftovers() == [f"trainer job {kept}"]  # the service still lists it

    # resumed (in this process, to save a start) with the option off: the kept job is deleted
    # once its state is loaded
    run(load_config(config, ["resume=true", "fireworks.keep_job_on_interrupt=false"]))
    assert f"fireworks: resumed from cross_job://{kept}/" in capfd.readouterr().err
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert emulator.emulator.jobs[kept]["deleted"] and emulator.emulator.leftovers() == []
    assert not (tmp_path / "stopped" / "fireworks_jobs.json").exists()


def test_a_failure_keeps_the_job_until_the_resumed_run_has_a_checkpoint_of_its_own(
        emulator: Any, tmp_path: Path, configs: Any) -> None:
    run(load_config(configs("full", keep=True)))
    config = configs("failed", keep=True)
    emulator.emulator.faults.die_after_steps = 4  # checkpoint at step 3, dies at step 5
    with pytest.raises(TrainingError, match="forward_backward failed"):
        run(load_config(config))
    emulator.emulator.faults.die_after_steps = None
    [kept] = ledger(tmp_path / "failed")
    assert emulator.emulator.leftovers() == [f"trainer job {kept}"]
    assert len(losses(tmp_path / "failed")) == 4

    summary = run(load_config(config, ["resume=true"]))  # the option still on
    assert summary["status"] == "completed"
    assert losses(tmp_path / "failed") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert emulator.emulator.jobs[kept]["deleted"] and emulator.emulator.leftovers() == []
    # kept while it held the newest state: deleted after the resumed run's first save
    requests = [(r.method, r.path) for r in emulator.emulator.requests]
    loaded = max(i for i, (_, p) in enumerate(requests) if p.endswith("/api/v1/load_weights"))
    deleted = [i for i, (m, p) in enumerate(requests) if m == "DELETE" and p.endswith(f"/{kept}")]
    saved = [i for i, (_, p) in enumerate(requests) if p.endswith("/api/v1/save_weights") and i > loaded]
    assert loaded < saved[0] < deleted[0]
    assert not (tmp_path / "failed" / "fireworks_jobs.json").exists()


def test_a_resumed_runs_checkpoint_cut_short_leaves_the_kept_job_for_the_next_resume(
        emulator: Any, tmp_path: Path, configs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept job holds the newest whole checkpoint's state until a newer checkpoint is whole:
    a disk that fills while the resumed run writes its first one (after the service saved the
    state) deletes nothing the older checkpoint needs, and a second resume continues from it."""
    import errno

    import preftune.checkpoint
    from preftune import DiskError

    run(load_config(configs("full", keep=True)))
    config = configs("cut", keep=True)
    emulator.emulator.faults.die_after_steps = 4  # checkpoint at step 3, dies at step 5
    with pytest.raises(TrainingError):
        run(load_config(config))
    emulator.emulator.faults.die_after_steps = None
    [kept] = ledger(tmp_path / "cut")

    def full_disk() -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # the resumed run's step-6 checkpoint: state saved, rng.pt not
        patch.setattr(preftune.checkpoint, "rng_state", full_disk)
        with pytest.raises((DiskError, OSError)):
            run(load_config(config, ["resume=true"]))
    assert not emulator.emulator.jobs[kept].get("deleted")  # the step-3 checkpoint's state is there
    assert ledger(tmp_path / "cut") == [kept]  # and the new run's job is gone
    summary = run(load_config(config, ["resume=true"]))
    assert summary["status"] == "completed"
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert emulator.emulator.leftovers() == []


def test_without_the_option_the_job_is_deleted_and_resume_says_its_state_is_gone(
        emulator: Any, tmp_path: Path, configs: Any, capfd: pytest.CaptureFixture[str]) -> None:
    config = configs("failed", keep=False)
    emulator.emulator.faults.die_after_steps = 4
    with pytest.raises(TrainingError, match="forward_backward failed"):
        run(load_config(config))
    emulator.emulator.faults.die_after_steps = None
    [job] = policy_jobs(emulator)
    assert emulator.emulator.leftovers() == []
    err = capfd.readouterr().err
    assert f"--resume cannot continue this run: its newest checkpoint's weights and optimizer state " \
           f"were saved on trainer job {job}, which was deleted" in err
    assert "keep_job_on_interrupt = true" in err
    with pytest.raises(ConfigError, match=rf"cannot load cross_job://{job}/\S+: trainer job {job}, "
                       "which saved it, was deleted"):
        run(load_config(config, ["resume=true"]))
    assert emulator.emulator.leftovers() == []


def test_with_the_option_but_no_checkpoint_nothing_is_kept(
        emulator: Any, tmp_path: Path, configs: Any, capfd: pytest.CaptureFixture[str]) -> None:
    emulator.emulator.faults.die_after_steps = 2
    with pytest.raises(TrainingError, match="forward_backward failed"):
        run(load_config(configs("nockpt", keep=True, checkpoint_interval=0)))
    assert emulator.emulator.leftovers() == []
    assert "no checkpoint holds state on a trainer job, so none is kept" in capfd.readouterr().err
