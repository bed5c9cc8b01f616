"""Several processes (torchrun, gloo, CPU) train as one: the same losses and weights as one
process, faults that stop every rank, resume on another number of processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preftune import ConfigError, get_registry
from preftune.loop import check_parallel
from preftune.world import World

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

CONFIG = """
base_model = "builtin:tiny"
dataset = "{data}"
log_path = "{log}"
cache_dir = "{cache}"
loss = "{loss}"
max_seq_len = 64
batch_size = {batch_size}
grad_accum = 2
epochs = {epochs}
eval_fraction = 0.25
eval_interval = 2
eval_samples = {eval_samples}
eval_sample_tokens = 6
learning_rate = 1e-3
checkpoint_interval = {checkpoint_interval}
sinks = {sinks}
lora_rank = {lora_rank}

[local]
threads = 1
parallel = "{parallel}"
dist_timeout_s = {dist_timeout_s}
{tables}
"""


def write_config(tmp_path: Path, name: str, data: Path, **settings: Any) -> Path:
    values = {"loss": "dpo", "batch_size": 4, "epochs": 2, "checkpoint_interval": 0,
              "parallel": "auto", "dist_timeout_s": 60, "lora_rank": 0, "sinks": '["jsonl"]', "tables": "",
              "eval_samples": 0, **settings}
    path = tmp_path / f"{name}.toml"
    path.write_text(CONFIG.format(data=data, log=tmp_path / name, cache=tmp_path / f"cache-{name}",
                                  **values))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}


def one_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "preftune", "run", str(config), *args],
                          capture_output=True, text=True, env=env(), timeout=300)


def torchrun(config: Path, n: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node n -m preftune run config``, as a user types it."""
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", str(n), "-m", "preftune", "run",
               str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_process_left() -> Any:
    """Whatever a test started is gone after it, even when it failed mid-way."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(command: list[str], environ: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(command, env=environ, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    STARTED.append(proc)
    return proc


def ranks(config: Path, n: int, *args: str) -> list[subprocess.Popen[str]]:
    """The ``n`` ranks started by hand (no torchrun agent that would stop the others for us)."""
    base = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n)}
    return [start([sys.executable, "-m", "preftune", "run", str(config), *args],
                  {**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]


def rows(log: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = log / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def same_training(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Per-step losses, held-out metrics and final weights of runs ``a`` and ``b`` agree."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], abs=tol), x["step"]
        assert x["tokens"] == y["tokens"]
    for x, y in zip(rows(a, "eval.jsonl"), rows(b, "eval.jsonl"), strict=True):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=tol)
    same = ("step", "index", "completion")  # greedy samples: the same tokens from the same weights
    assert [[r[k] for k in same] for r in rows(a, "samples.jsonl")] == \
        [[r[k] for k in same] for r in rows(b, "samples.jsonl")]
    name = "adapter_model.safetensors" if (a / "final" / "adapter_model.safetensors").exists() \
        else "model.safetensors"
    wa, wb = (load_file(str(p / "final" / name)) for p in (a, b))
    assert sorted(wa) == sorted(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


def resume_cut(source: Path, copy: Path, config: Path, n: int) -> subprocess.CompletedProcess[str]:
    """Run ``source`` copied to ``copy`` as if killed after step 4 (no ``final/``, no step-6
    checkpoint, no summary), resumed on ``n`` processes."""
    subprocess.run(["cp", "-r", str(source), str(copy)], check=True)
    for path in (copy / "final", copy / "checkpoints" / "step-00000006"):
        subprocess.run(["rm", "-r", str(path)], check=True)
    (copy / "summary.json").unlink(missing_ok=True)
    args = ("--set", f"log_path={copy}", "--resume")
    done = one_process(config, *args) if n == 1 else torchrun(config, n, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for_step(log: Path, step: int, procs: list[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank ended early: " + "".join(p.stderr.read() for p in procs))
        if any(r["step"] >= step for r in rows(log)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{log} never reached step {step}")


@pytest.mark.parametrize("loss,parallel,batch_size,records", [
    ("dpo", "auto", 3, 25),  # batch 3 over 2 ranks: shares of 2 and 1; the last step has 1 pair
    ("orpo", "ddp", 4, 24),
    ("dpo", "fsdp", 4, 24),
    ("orpo", "fsdp", 3, 25),
    ("rpo", "ddp", 3, 25),  # DPO plus the chosen NLL per token over the whole micro-batch
])
def test_two_processes_train_as_one(tmp_path: Path, small_dataset: Any, loss: str, parallel: str,
                                    batch_size: int, records: int) -> None:
    data = small_dataset(tmp_path / "data.jsonl", n=records)
    settings = {"loss": loss, "parallel": parallel, "batch_size": batch_size, "eval_samples": 2}
    one = one_process(write_config(tmp_path, "one", data, **settings))
    assert one.returncode == 0, one.stderr
    two = torchrun(write_config(tmp_path, "two", data, **settings), 2)
    assert two.returncode == 0, two.stderr[-3000:]
    same_training(tmp_path / "one", tmp_path / "two")
    summary = json.loads(two.stdout)  # one summary, from the main rank
    assert summary["status"] == "completed" and summary["processes"] == 2
    assert f"{'ddp' if parallel == 'auto' else parallel} over 2 processes" in two.stderr
    assert two.stderr.count("training pairs,") == 1  # messages from the main rank only
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["status"] == "completed"
    assert len(rows(tmp_path / "two", "samples.jsonl")) == 2 * len(rows(tmp_path / "two", "eval.jsonl"))


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_fsdp_trains_as_one_and_its_checkpoints_resume_on_another_number(
        tmp_path: Path, small_dataset: Any, lora_rank: int) -> None:
    """With LoRA the base is the reference (adapter off, through the sharded model). weight_sync
    publishes the weights gathered from the shards. The sharded checkpoint
    (torch.distributed.checkpoint) resumes on one process, and one process's on two."""
    data = small_dataset(tmp_path / "data.jsonl")
    settings = {"lora_rank": lora_rank, "parallel": "fsdp", "checkpoint_interval": 2,
                "sinks": '["jsonl", "weight_sync"]', "tables": "[weight_sync]\nweight_sync_interval = 3"}
    one = one_process(write_config(tmp_path, "one", data, **settings))
    assert one.returncode == 0, one.stderr
    config = write_config(tmp_path, "two", data, **settings)
    two = torchrun(config, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    same_training(tmp_path / "one", tmp_path / "two")
    # weight_sync publishes the weights gathered from the shards: the last snapshot is final/'s
    snapshots = tmp_path / "two" / "deployments" / "preftune" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-00000003", "step-00000006"]
    name = "adapter_model.safetensors" if lora_rank else "model.safetensors"
    final = load_file(str(tmp_path / "two" / "final" / name))
    published = load_file(str(snapshots / "step-00000006" / name))
    assert sorted(final) == sorted(published)
    assert all(torch.equal(final[k], published[k]) for k in final)
    assert (tmp_path / "two" / "checkpoints" / "step-00000004" / "backend" / ".metadata").is_file()
    for source, n in (("two", 1), ("one", 2)):  # 2 processes to 1, and 1 to 2
        copy = tmp_path / f"{source}-on-{n}"
        done = resume_cut(tmp_path / source, copy, config, n)
        assert "resumed from" in done.stderr and "(step 4)" in done.stderr
        same_training(tmp_path / "one", copy)


def test_killed_rank_stops_the_other_and_the_run_resumes_on_one_or_two(
        tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    settings = {"epochs": 4, "checkpoint_interval": 2}
    full = one_process(write_config(tmp_path, "full", data, **settings))
    assert full.returncode == 0, full.stderr
    config = write_config(tmp_path, "killed", data, **settings)
    procs = ranks(config, 2)
    wait_for_step(tmp_path / "killed", 3, procs)
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    assert procs[0].wait(timeout=90) == 2
    assert time.monotonic() - start < 60  # dist_timeout_s bounds it; a dead peer is seen at once
    err = procs[0].stderr.read()
    assert f"rank 0: lost rank 1 (PID {procs[1].pid}, no longer running)" in err, err
    assert "Traceback" not in err
    for n, name in ((1, "on-one"), (2, "on-two")):
        copy = tmp_path / name
        subprocess.run(["cp", "-r", str(tmp_path / "killed"), str(copy)], check=True)
        args = ("--set", f"log_path={copy}", "--resume")
        done = one_process(config, *args) if n == 1 else torchrun(config, 2, *args)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" in done.stderr
        same_training(tmp_path / "full", copy)


def test_a_hung_rank_stops_the_other_within_dist_timeout_s(tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    config = write_config(tmp_path, "run", data, epochs=200, dist_timeout_s=5)
    procs = ranks(config, 2)
    wait_for_step(tmp_path / "run", 2, procs)
    procs[1].send_signal(signal.SIGSTOP)  # alive, and answering nothing
    start = time.monotonic()
    assert procs[0].wait(timeout=60) == 2
    assert time.monotonic() - start < 30
    err = procs[0].stderr.read()
    assert "rank 0: lost contact with another rank" in err and "dist_timeout_s = 5" in err, err
    assert "Traceback" not in err


def test_sigterm_on_one_rank_stops_every_rank_with_one_checkpoint(
        tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    config = write_config(tmp_path, "run", data, epochs=50, checkpoint_interval=1000)
    procs = ranks(config, 2)
    wait_for_step(tmp_path / "run", 2, procs)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=90) for p in procs] == [143, 143]
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    err = procs[0].stderr.read()
    assert f"stopped by SIGTERM after step {int(saved[0].name[5:])}" in err
    assert "resume with: preftune run" in err and "torchrun" in err
    assert procs[1].stderr.read().count("stopped by") == 0  # said once, by the main rank
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped"


def test_the_preftune_command_started_by_torchrun(tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    config = write_config(tmp_path, "run", data, epochs=1)
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python",
               str(Path(sys.executable).parent / "preftune"), "run", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["processes"] == 2


def test_torchrun_restart_resumes_from_the_newest_checkpoint(tmp_path: Path,
                                                              small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    settings = {"epochs": 4, "checkpoint_interval": 2}
    full = one_process(write_config(tmp_path, "full", data, **settings))
    assert full.returncode == 0, full.stderr
    config = write_config(tmp_path, "job", data, **settings)
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
               "-m", "preftune", "run", str(config)]
    job = start(command, env())
    wait_for_step(tmp_path / "job", 3, [job])
    os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    assert "torchrun restarted this job (restart 1): resuming" in err
    same_training(tmp_path / "full", tmp_path / "job")


def rank_pid(agent: int, rank: int) -> int:
    """The PID of torchrun's worker ``rank`` (its environment says RANK)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().split(") ")[1].split()[1]) != agent:
                continue
            environ = (child / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child.name)
    raise AssertionError(f"no rank {rank} under PID {agent}")


def test_a_remote_backend_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                    make_config: Any) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="backend 'tinker' does not train as several processes"):
        check_parallel(get_registry(), make_config(backend="tinker"))
    check_parallel(get_registry(), make_config())  # local does


def test_shares_cover_each_batch_once_and_no_rank_idles() -> None:
    for size in (1, 2, 3):
        for n in range(1, 8):
            batch = list(range(10, 10 + n))
            shares = [World(rank=r, size=size).share(batch) for r in range(size)]
            owned = [i for index, stand_in in shares if not stand_in for i in index]
            assert owned == batch
            assert all(index for index, _ in shares)  # a stand-in pair where a share is empty
            assert max(len(i) for i, s in shares if not s) - min(
                (len(i) for i, s in shares if not s), default=0) <= 1


def test_one_process_makes_no_process_group(make_config: Any) -> None:
    from preftune import run

    run(make_config(epochs=1))
    assert not torch.distributed.is_initialized()


def test_world_env_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from preftune.world import make_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match="RANK 5 is not a rank of WORLD_SIZE 2"):
        make_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set: start the run with torchrun"):
        make_world()


@pytest.mark.parametrize("setting,value,key", [
    ("merge_lora", True, "local.merge_lora"),
])
def test_what_fsdp_cannot_do_yet_is_refused_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, make_config: Any, setting: str, value: Any, key: str) -> None:
    config = make_config(lora_rank=4, local={"parallel": "fsdp", setting: value})
    get_registry().check("backend", "local", config)  # one process: fsdp is not used
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=f"field '{key}'.*parallel = 'fsdp'"):
        get_registry().check("backend", "local", config)


def test_a_resume_on_as_many_processes_is_exact_with_lora_dropout(tmp_path: Path,
                                                                   small_dataset: Any) -> None:
    """Each rank draws its own dropout masks; a checkpoint keeps every rank's generators."""
    data = small_dataset(tmp_path / "data.jsonl")
    config = write_config(tmp_path, "run", data, lora_rank=4, checkpoint_interval=2,
                          tables="lora_dropout = 0.1")  # in [local], the last table
    done = torchrun(config, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    resume_cut(tmp_path / "run", tmp_path / "again", config, 2)
    same_training(tmp_path / "run", tmp_path / "again", tol=0.0)


@pytest.mark.parametrize("precision", ["bf16-true", "fp16-mixed"])
def test_low_precisions_under_fsdp_train_as_one_and_resume_exactly(
        tmp_path: Path, small_dataset: Any, precision: str) -> None:
    """bf16-true: the Kahan-compensated AdamW updates each rank's shards in place. fp16-mixed:
    the ranks agree on overflows. Both follow one process's run to their rounding (a lost update
    would leave the loss at ln 2), and a resume on as many processes is exact (the shards of the
    optimizer state, the loss scale)."""
    data = small_dataset(tmp_path / "data.jsonl")
    tables = f'precision = "{precision}"'  # in [local], the last table
    one = one_process(write_config(tmp_path, "one", data, tables=tables))
    assert one.returncode == 0, one.stderr
    config = write_config(tmp_path, "two", data, tables=tables, parallel="fsdp", checkpoint_interval=2)
    two = torchrun(config, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert rows(tmp_path / "two")[-1]["loss"] < 0.3
    same_training(tmp_path / "one", tmp_path / "two", tol=1e-2)
    resume_cut(tmp_path / "two", tmp_path / "again", config, 2)
    same_training(tmp_path / "two", tmp_path / "again", tol=0.0)
