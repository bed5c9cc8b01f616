"""Disks: a log_path or cache_dir that is a file, unwritable or full; damaged checkpoints; final/
written whole; what interrupted saves leave behind; file modes (issue 15).

A full disk is real in two ways: a small tmpfs filled up mid-run (needs root and mount; skipped
elsewhere), and everywhere a file-size limit (RLIMIT_FSIZE, the kernel's EFBIG) set mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from preftune import ConfigError, DiskError, get_plugin_manager, hookimpl, load_config, run
from preftune.cli import app
from preftune.fileio import locked_temp, remove_stale

ENV = {**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``tmpfs(path, options)`` mounts a tmpfs there for the test; skips where that is not allowed."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.parametrize("key", ["log_path", "cache_dir"])
@pytest.mark.parametrize("under", [False, True], ids=["the-file", "under-a-file"])
def test_a_log_path_or_cache_dir_that_is_a_file_is_named_before_anything_loads(
    make_config: Any, tmp_path: Path, key: str, under: bool
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    path = blocker / "sub" if under else blocker
    cause = f"{blocker} is a file" if under else "it is a file"
    config = make_config(**{key: str(path)})
    with pytest.raises(DiskError, match=f"^cannot create {key} {path}: {cause}$"):
        run(config)
    assert blocker.read_text() == "a file" and not (tmp_path / "logs" / "config.json").exists()


def test_the_command_line_says_a_disk_error_in_one_line_without_a_traceback(
    tmp_path: Path, small_dataset: Any, config_file: Any
) -> None:
    (tmp_path / "logs").write_text("a file")
    config = config_file(tmp_path / "c.toml", small_dataset(tmp_path / "d.jsonl"), tmp_path / "logs",
                         tmp_path / "cache")
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert result.output == f"error: cannot create log_path {tmp_path / 'logs'}: it is a file\n"


@pytest.mark.parametrize("key", ["log_path", "cache_dir"])
@pytest.mark.parametrize("how", ["chmod-0500", "read-only-mount"])
def test_an_unwritable_log_path_or_cache_dir_is_named_with_the_cause(
    make_config: Any, tmp_path: Path, tmpfs: Any, key: str, how: str
) -> None:
    place = tmp_path / "place"
    if how == "chmod-0500":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0500 directory")
        place.mkdir(mode=0o500)
        cause = "Permission denied"
    else:
        tmpfs(place, "ro,size=1m")
        cause = "Read-only file system"
    with pytest.raises(DiskError, match=f"^cannot write {key} {place / 'runs'}: {cause}$"):
        run(make_config(**{key: str(place / "runs")}))
    assert not (tmp_path / "logs" / "config.json").exists()


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Filler:
    """A sink that fills the disk holding ``path`` once the first checkpoint is written (as
    another program writing a large file would)."""

    def __init__(self, path: Path):
        self.path = path

    @hookimpl
    def preftune_checkpoint(self, step: int, path: str) -> None:
        if step == 3:
            with open(self.path, "wb") as ballast:
                try:
                    while True:
                        ballast.write(b"\0" * 65536)
                        ballast.flush()
                except OSError:
                    pass


class FillerPlugin:
    def __init__(self, path: Path):
        self.path = path

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("filler", lambda config, options: Filler(self.path))


def test_a_disk_that_fills_up_mid_run_is_named_and_the_earlier_checkpoint_resumes(
    make_config: Any, tmp_path: Path, tmpfs: Any, capsys: Any
) -> None:
    disk = tmpfs(tmp_path / "disk", "size=6m")
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(FillerPlugin(disk / "ballast"))
    config = make_config(log_path=str(disk / "logs"), epochs=3, checkpoint_interval=3,
                         sinks=["jsonl", "filler"])  # 15 steps
    with pytest.raises(DiskError, match=rf"^cannot write {disk}/logs/\S+: No space left on device$"):
        run(config, pm)
    checkpoints = disk / "logs" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000003"]  # no temporary left
    assert not (disk / "logs" / "final").exists()
    (disk / "ballast").unlink()
    capsys.readouterr()
    summary = run(config.model_copy(update={"resume": True, "sinks": ["jsonl"]}))
    assert summary["status"] == "completed" and summary["steps"] == 15
    assert f"resumed from {checkpoints / 'step-00000003'} (step 3)" in capsys.readouterr().err
    assert [r["step"] for r in rows(disk / "logs" / "metrics.jsonl")] == list(range(1, 16))


FSIZE_AFTER_FIRST_CHECKPOINT = """
import resource, sys
import preftune.checkpoint as checkpoint
from preftune.cli import main
save = checkpoint.save
def save_then_limit(*args, **kwargs):
    path = save(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
    return path
checkpoint.save = save_then_limit
main()
"""


def test_a_file_size_limit_mid_run_is_an_error_naming_the_checkpoint_and_the_previous_resumes(
    tmp_path: Path, small_dataset: Any, config_file: Any, capsys: Any
) -> None:
    log = tmp_path / "logs"
    config = config_file(tmp_path / "c.toml", small_dataset(tmp_path / "d.jsonl"), log,
                         tmp_path / "cache", epochs=2, checkpoint_interval=3)
    done = subprocess.run([sys.executable, "-c", FSIZE_AFTER_FIRST_CHECKPOINT, "run", str(config)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    # Python ignores SIGXFSZ: the write fails with EFBIG, said in one line
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: cannot write {log}/checkpoints/step-00000006: File too large")
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert sorted(p.name for p in (log / "checkpoints").iterdir()) == ["step-00000003"]
    summary = run(load_config(config, ["resume=true"]))
    assert summary["status"] == "completed" and summary["steps"] == 18
    assert "resumed from" in capsys.readouterr().err


def damage(checkpoint: Path, how: str) -> None:
    if how == "truncated state":
        state = checkpoint / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    elif how == "missing optimizer":
        (checkpoint / "backend" / "optimizer.pt").unlink()
    elif how == "truncated weights":
        weights = checkpoint / "backend" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])


def test_resume_skips_unreadable_checkpoints_names_them_and_matches_the_uninterrupted_run(
    make_config: Any, tmp_path: Path, capsys: Any
) -> None:
    config = make_config(epochs=2, checkpoint_interval=2, keep_checkpoints=4)
    run(config)  # 10 steps; checkpoints at steps 4, 6, 8, 10
    log = Path(config.log_path)
    expected = load_file(str(log / "final" / "model.safetensors"))
    root = log / "checkpoints"
    damage(root / "step-00000010", "truncated state")
    damage(root / "step-00000008", "missing optimizer")
    capsys.readouterr()
    shutil.rmtree(log / "final")
    assert run(config.model_copy(update={"resume": True}))["steps"] == 10
    err = capsys.readouterr().err
    assert f"resume: skipping checkpoint {root / 'step-00000010'} is unreadable (JSONDecodeError" in err
    assert f"resume: skipping checkpoint {root / 'step-00000008'} is unreadable (FileNotFoundError" in err
    assert f"resumed from {root / 'step-00000006'} (step 6)" in err
    for name, tensor in load_file(str(log / "final" / "model.safetensors")).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)  # exactly as if whole

    for checkpoint in sorted(root.iterdir()):
        damage(checkpoint, "truncated weights")
    shutil.rmtree(log / "final")  # else the completed run is not resumed at all
    with pytest.raises(ConfigError, match=f"cannot resume: no readable checkpoint in {root}:\n"
                                          f"checkpoint {root / 'step-00000010'} is unreadable"):
        run(config.model_copy(update={"resume": True}))


KILL_WHILE_SAVING_THE_TOKENIZER = """
import os, signal
import transformers
from preftune.cli import main
def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
transformers.PreTrainedTokenizerBase.save_pretrained = killed
main()
"""


def test_final_is_written_whole_and_a_killed_saves_leftover_is_removed_by_the_next_run(
    tmp_path: Path, small_dataset: Any, config_file: Any, capsys: Any
) -> None:
    log = tmp_path / "logs"
    config = config_file(tmp_path / "c.toml", small_dataset(tmp_path / "d.jsonl"), log,
                         tmp_path / "cache", epochs=1, checkpoint_interval=0)
    done = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING_THE_TOKENIZER, "run", str(config)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == -9, done.stderr
    [partial] = log.glob(".final.*")  # the weights were written, the tokenizer was not
    assert (partial / "model.safetensors").exists() and not (partial / "tokenizer.json").exists()
    assert not (log / "final").exists()

    summary = run(load_config(config))
    assert f"removed what interrupted saves left behind: {partial}" in capsys.readouterr().err
    assert not partial.exists() and summary["weights"] == str(log / "final")
    from transformers import AutoTokenizer

    from preftune.tiny import tiny_tokenizer

    saved, tiny = AutoTokenizer.from_pretrained(summary["weights"]), tiny_tokenizer()
    assert len(saved) == len(tiny) and saved.chat_template == tiny.chat_template
    assert (log / "final" / "model.safetensors").exists()


def test_only_temporaries_no_live_process_holds_are_removed(tmp_path: Path) -> None:
    live, fd = locked_temp(tmp_path, ".cache.pt.", ".tmp")  # a write in progress (this process)
    dead, dead_fd = locked_temp(tmp_path, ".other.pt.", ".tmp")
    os.close(dead_fd)  # its writer died: the kernel dropped its lock
    dead_dir, dead_dir_fd = locked_temp(tmp_path, ".final.", directory=True)
    (Path(dead_dir) / "model.safetensors").write_bytes(b"x")
    os.close(dead_dir_fd)
    (tmp_path / "kept.pt").write_bytes(b"a finished file")
    try:
        assert remove_stale(tmp_path, [".*.tmp", ".final.*"]) == sorted([Path(dead), Path(dead_dir)])
        assert Path(live).exists() and (tmp_path / "kept.pt").exists()
    finally:
        os.close(fd)
    assert remove_stale(tmp_path, [".*.tmp"]) == [Path(live)]


def test_files_and_directories_follow_the_umask(make_config: Any, tmp_path: Path) -> None:
    config = make_config(epochs=1, checkpoint_interval=3, sinks=["jsonl", "weight_sync"])
    old = os.umask(0o027)
    try:
        run(config)
    finally:
        os.umask(old)
    made = [p for top in (tmp_path / "logs", tmp_path / "cache") for p in [top, *top.rglob("*")]
            if not p.is_symlink()]
    names = {p.relative_to(tmp_path).as_posix() for p in made}
    assert {"logs/config.json", "logs/final/model.safetensors", "logs/final/tokenizer.json",
            "logs/checkpoints/step-00000003/backend/optimizer.pt",
            "logs/deployments/preftune/snapshots/step-00000005/manifest.json"} <= names
    assert any(n.startswith("cache/reference/") for n in names)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert {n: m for n, m in modes.items() if m != (0o750 if (tmp_path / n).is_dir() else 0o640)} == {}


def test_a_run_removes_what_killed_saves_left_everywhere_but_not_a_live_write(
    make_config: Any, tmp_path: Path, capsys: Any
) -> None:
    log, cache = tmp_path / "logs", tmp_path / "cache"
    snapshots = log / "deployments" / "preftune" / "snapshots"
    dead = []
    for parent, prefix, directory in [
        (log, ".final.", True), (log / "checkpoints", ".step-00000003.", True),
        (cache / "reference", ".x.pt.", False), (cache / "tokenized", ".x.pt.", False),
        (snapshots, ".step-00000002.", True),
    ]:
        parent.mkdir(parents=True, exist_ok=True)
        path, fd = locked_temp(parent, prefix, "" if directory else ".tmp", directory)
        os.close(fd)  # as a SIGKILL would
        dead.append(Path(path))
    live, fd = locked_temp(cache / "reference", ".y.pt.", ".tmp")  # another run, still writing
    try:
        run(make_config(epochs=1, sinks=["jsonl", "weight_sync"]))
        err = capsys.readouterr().err
        assert not [p for p in dead if p.exists()] and Path(live).exists()
        assert all(str(p) in err for p in dead) and live not in err
        assert "removed what interrupted saves left behind" in err
        assert "removed what interrupted publishes left behind" in err
    finally:
        os.close(fd)


def test_the_command_line_says_an_os_error_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (tmp_path / "taken").write_text("a file")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out",
                                      str(tmp_path / "taken" / "report")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'taken' / 'report'}: Not a directory\n"
