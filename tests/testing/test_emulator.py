"""The emulator as a user runs it: a command on a port that says what clients left behind."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from preftune.testing import Emulator, Server
from preftune.testing.emulator import model_map


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_the_command_serves_on_loopback_and_names_what_was_left_behind() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "preftune.testing.emulator", "--port", str(port),
                             "--model", "accounts/fireworks/models/tiny=builtin:tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"preftune emulator on http://127.0.0.1:{port}" in proc.stdout.readline()
        session = post(f"http://127.0.0.1:{port}/api/v1/create_session", {"tags": []})["session_id"]
        job = post(f"http://127.0.0.1:{port}/v1/accounts/emulated/rlorTrainerJobs?rlorTrainerJobId=j1",
                   {"trainingConfig": {"baseModel": "accounts/fireworks/models/tiny"}})
        assert job["state"] == "JOB_STATE_RUNNING"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"left behind: trainer job j1, session {session}" in out
    assert proc.returncode == 1


def test_unknown_calls_and_bad_bodies_get_http_errors_not_hangs() -> None:
    with Server(Emulator()) as server:
        for path, status in [("/api/v1/nope", 404), ("/api/v1/forward_backward", 500)]:
            start = time.monotonic()
            try:
                post(server.url + path, {"model_id": "missing"})
            except urllib.error.HTTPError as exc:
                assert exc.code in (status, 400, 404)
                assert "error" in json.loads(exc.read())
            else:
                raise AssertionError(f"{path} answered 200")
            assert time.monotonic() - start < 5
        assert server.httpd.server_address[0] == "127.0.0.1"


# The Fireworks control plane as the SDK reads it: checkpoints, promote, model names, telemetry.

TINY = "accounts/fireworks/models/tiny"  # a service's name, mapped to builtin:tiny


@pytest.fixture
def fireworks(emulator: Any) -> Any:
    """``start(job_id, lora_rank)``: a ready trainer job on the emulator (base model ``TINY``)
    and a training client on it, through the real SDK; ``manager`` is its TrainerJobManager."""
    from fireworks.training import sdk
    from fireworks.training.sdk import trainer

    emulator.emulator.model_map[TINY] = "builtin:tiny"
    manager = trainer.TrainerJobManager(api_key="fw-emulator-key", base_url=emulator.url)
    services: list[Any] = []

    def start(job_id: str, lora_rank: int) -> Any:
        manager.create(trainer.TrainerJobConfig(base_model=TINY, lora_rank=lora_rank, max_context_length=64,
                                                requested_job_id=job_id))
        endpoint = manager.wait_for_ready(job_id, poll_interval_s=0.05, timeout_s=30)
        services.append(sdk.FiretitanServiceClient(base_url=endpoint.base_url, api_key="fw-emulator-key"))
        return services[-1].create_training_client(TINY, lora_rank=lora_rank)

    yield SimpleNamespace(start=start, manager=manager, emulator=emulator)
    for service in services:
        service.close()


def short(row: dict[str, Any]) -> str:
    return str(row["name"]).rsplit("/", 1)[-1]


def test_checkpoints_are_listed_oldest_first_with_times_types_and_promotability(fireworks: Any) -> None:
    lora = fireworks.start("lora", 4)
    lora.save_state("s1").result()
    sampler = lora.save_weights_for_sampler_ext("s1")  # the SDK suffixes its session id
    full = fireworks.start("full", 0)
    first = full.save_weights_for_sampler_ext("a")  # a full fine-tune: base, then deltas
    second = full.save_weights_for_sampler_ext("b")
    rows = fireworks.manager.list_checkpoints("lora")
    assert [(short(r), r["checkpointType"], r["promotable"]) for r in rows] == [
        ("s1", "CHECKPOINT_TYPE_TRAINING_LORA", False),
        (sampler.snapshot_name, "CHECKPOINT_TYPE_INFERENCE_LORA", True)]
    assert rows[0]["name"] == "accounts/emulated/rlorTrainerJobs/lora/checkpoints/s1"
    times = [datetime.fromisoformat(r["createTime"].replace("Z", "+00:00")) for r in rows]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert all(r["updateTime"] >= r["createTime"] for r in rows)
    rows = fireworks.manager.list_checkpoints("full")
    assert [(short(r), r["checkpointType"], r["promotable"]) for r in rows] == [
        (first.snapshot_name, "CHECKPOINT_TYPE_INFERENCE_BASE", True),
        (second.snapshot_name, "CHECKPOINT_TYPE_INFERENCE_ARC_V2", False)]
    full.save_state("s1").result()
    assert fireworks.manager.list_checkpoints("full")[-1]["checkpointType"] == "CHECKPOINT_TYPE_TRAINING"
    fireworks.manager.delete("full")  # the service keeps a deleted job's record
    assert len(fireworks.manager.list_checkpoints("full")) == 3


def test_a_promoted_checkpoint_becomes_a_model_and_bad_promotes_are_4xx(fireworks: Any) -> None:
    client = fireworks.start("job", 4)
    client.save_state("state").result()
    sampler = client.save_weights_for_sampler_ext("final")
    rows = {short(r): r for r in fireworks.manager.list_checkpoints("job")}
    manager = fireworks.manager
    model = manager.promote_checkpoint(name=rows[sampler.snapshot_name]["name"], output_model_id="my-model",
                                       base_model=TINY)
    assert model["name"] == "accounts/emulated/models/my-model" and model["kind"] == "HF_PEFT_ADDON"
    assert model["peftDetails"]["r"] == 4 and "q_proj" in model["peftDetails"]["targetModules"]
    served = get(f"{fireworks.emulator.url}/v1/accounts/emulated/models/my-model")
    assert served["name"] == model["name"] and served["state"] == "READY"
    promoted = fireworks.emulator.emulator.requests[-2]  # the SDK's body, as it sends it
    assert promoted.path == f"/v1/accounts/emulated/checkpoints/{sampler.snapshot_name}:promote"
    assert promoted.json() == {"output_model": "accounts/emulated/models/my-model", "base_model": TINY,
                               "trainer_job_id": "accounts/emulated/rlorTrainerJobs/job",
                               "async_promotion": True}
    cases = [(rows["state"]["name"], "other", TINY, r"HTTP 400.*not promotable \(CHECKPOINT_TYPE_TRAINING"),
             (rows["state"]["name"].replace("state", "nope"), "other", TINY, "HTTP 404.*'nope' not found"),
             (rows[sampler.snapshot_name]["name"], "my-model", TINY, "HTTP 409.*already exists"),
             (rows[sampler.snapshot_name]["name"], "other", "builtin:tiny", "HTTP 400.*does not match")]
    for name, model_id, base_model, error in cases:
        with pytest.raises(RuntimeError, match="(?s)" + error):
            manager.promote_checkpoint(name=name, output_model_id=model_id, base_model=base_model)


def test_a_resumable_save_and_a_sampler_save_of_one_name_are_two_checkpoints(fireworks: Any) -> None:
    client = fireworks.start("job", 4)
    job_url = f"{fireworks.emulator.url}/training/v1/rlorTrainerJobs/emulated/job/api/v1"
    client.save_state("same").result()
    post(f"{job_url}/save_weights_for_sampler", {"model_id": client.model_id, "path": "same"})
    rows = fireworks.manager.list_checkpoints("job")
    assert [(short(r), r["checkpointType"]) for r in rows] == [
        ("same", "CHECKPOINT_TYPE_TRAINING_LORA"), ("same", "CHECKPOINT_TYPE_INFERENCE_LORA")]
    client.load_state_with_optimizer("same").result()  # the resumable one, still there
    post(f"{job_url}/save_weights_for_sampler", {"model_id": client.model_id, "path": "only-sampler"})
    with pytest.raises(Exception, match="a sampler checkpoint cannot be loaded"):
        client.load_state_with_optimizer("only-sampler").result()


def test_service_model_names_load_only_when_mapped(fireworks: Any) -> None:
    from fireworks.training.sdk import trainer

    config = trainer.TrainerJobConfig(base_model="accounts/fireworks/models/qwen3-8b", lora_rank=4,
                                      max_context_length=64, requested_job_id="unmapped")
    with pytest.raises(Exception, match=r"(?s)cannot load 'accounts/fireworks/models/qwen3-8b'.*--model "
                                        r"accounts/fireworks/models/qwen3-8b=PATH.*PREFTUNE_EMULATOR_MODELS"):
        fireworks.manager.create(config)
    assert "unmapped" not in fireworks.emulator.emulator.jobs
    client = fireworks.start("mapped", 4)  # TINY is mapped to builtin:tiny
    assert client.forward([], "cross_entropy") is not None


def test_model_mappings_from_flags_and_the_environment() -> None:
    assert model_map(["a=builtin:tiny"], "b=/models/b, a=/models/a") == {"a": "builtin:tiny",
                                                                           "b": "/models/b"}
    for bad in (["a"], ["=x"], ["a="]):
        with pytest.raises(ValueError, match="NAME=PATH"):
            model_map(bad)
    emulator = Emulator(models={"*": "builtin:tiny"})
    assert emulator.local_model("accounts/x/models/y") == "builtin:tiny"
    assert Emulator().local_model("/some/dir") == "/some/dir"


def test_telemetry_is_accepted_as_both_sdks_validate_it() -> None:
    from fireworks.training.sdk.types import TelemetryResponse as FireworksTelemetry
    from tinker.types.telemetry_response import TelemetryResponse as TinkerTelemetry

    with Server(Emulator()) as server:
        for url in (f"{server.url}/api/v1/telemetry",
                    f"{server.url}/training/v1/rlorTrainerJobs/emulated/job/api/v1/telemetry"):
            answer = post(url, {"events": [], "session_id": "s"})
            assert TinkerTelemetry.model_validate(answer).status == "accepted"
            assert FireworksTelemetry.model_validate(answer).status == "accepted"


def test_promoted_models_are_listed_paged_fetched_and_deleted_with_the_fireworks_client(
        fireworks: Any, tmp_path: Any) -> None:
    from fireworks import Fireworks, NotFoundError
    from fireworks.training.sdk.fireworks_client import FireworksClient

    client = fireworks.start("job", 4)
    for i in range(3):
        client.save_weights_for_sampler_ext(f"s{i}")
    saved = [r["name"] for r in fireworks.manager.list_checkpoints("job")]
    for i, checkpoint in enumerate(saved):
        fireworks.manager.promote_checkpoint(name=checkpoint, output_model_id=f"m{i}", base_model=TINY)
    api = Fireworks(api_key="fw-emulator-key", account_id="emulated", base_url=fireworks.emulator.url)
    listed = list(api.models.list(page_size=2))  # the client follows nextPageToken
    assert [m.name for m in listed] == [f"accounts/emulated/models/m{i}" for i in range(3)]
    assert {m.kind for m in listed} == {"HF_PEFT_ADDON"} and {m.state for m in listed} == {"READY"}
    assert api.models.get("m1").peft_details.r == 4
    api.models.delete("m1")
    assert [m.name.rsplit("/", 1)[-1] for m in api.models.list()] == ["m0", "m2"]
    with pytest.raises(NotFoundError):
        api.models.get("m1")
    fireworks.manager.promote_checkpoint(name=saved[1], output_model_id="m1", base_model=TINY)  # free again
    # A base model the emulator loads is a model record too: the SDK reads whether it is an MoE.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 8}))
    fireworks.emulator.emulator.model_map["accounts/fireworks/models/moe"] = str(tmp_path)
    with FireworksClient(api_key="fw-emulator-key", base_url=fireworks.emulator.url) as control:
        assert control.model_is_moe(TINY) is False
        assert control.model_is_moe("accounts/fireworks/models/moe") is True
        with pytest.raises(Exception, match="HTTP 404"):
            control.model_is_moe("accounts/fireworks/models/unmapped")


def test_a_deleted_job_is_a_tombstone_whose_id_cannot_be_used_again(fireworks: Any) -> None:
    from fireworks.training.sdk import trainer

    fireworks.start("gone", 4).save_state("s").result()
    fireworks.manager.delete("gone")
    assert fireworks.manager.get("gone")["state"] == "JOB_STATE_DELETED"  # the SDK's tombstone state
    assert [short(r) for r in fireworks.manager.list_checkpoints("gone")] == ["s"]
    config = trainer.TrainerJobConfig(base_model=TINY, lora_rank=4, max_context_length=64,
                                      requested_job_id="gone")
    with pytest.raises(RuntimeError, match="(?s)Trainer job gone is archived and cannot be recreated"):
        fireworks.manager.create(config)
    with pytest.raises(RuntimeError, match="(?s)gone is archived"):
        fireworks.manager.wait_for_ready("gone", poll_interval_s=0.05, timeout_s=5)
    with pytest.raises(RuntimeError, match="was not found in this account"):
        fireworks.manager.get("never-made")
