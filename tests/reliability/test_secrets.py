"""A secret given in the wrong place, or inside a URL, is never printed or written (issue 23).

Keys pasted where a variable's name belongs (``api_key_env``), secret settings given with
``--set``, and passwords in URLs' user-info: each is refused or used without ever appearing in
stderr, stdout, ``config.json``, W&B's files or any other file under ``log_path``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from preftune import Config, ConfigError, get_plugin_manager, get_registry, hookimpl, load_config, run
from preftune.cli import app
from preftune.secrets import looks_like_key, looks_like_secret, mask_secrets, mask_setting

runner = CliRunner()

FW_KEY = "fw_3ZgQ8kLm2Qp9xZ7vB1nR4sT6yU5wE2iO7pAq9Xc4Vb8Nm1Zk"  # 51 characters, as the user's
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
PASSWORD = "pw-Zq8Xk2Lm9Rt4"
KEYS = [FW_KEY, "fw-" + FW_KEY[3:], "tml-" + FW_KEY[3:], "sk-proj-" + FW_KEY[3:], "sk_live_" + FW_KEY[3:],
        "hf_" + FW_KEY[3:37], "ghp_" + FW_KEY[3:39], "gho_" + FW_KEY[3:39], "github_pat_11AB" + FW_KEY[3:],
        "xoxb-1234567890-9876543210-" + FW_KEY[3:27], "AKIAIOSFODNN7EXAMPLE", "wandb_v1_" + FW_KEY[3:],
        FW_KEY[3:], FW_KEY[10:30]]
ORDINARY = ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "HuggingFaceTB/SmolLM2-135M-Instruct", "builtin:tiny",
            "/data/runs/2024-01-01/train.jsonl", "./preftune_logs", "https://api.fireworks.ai",
            "http://127.0.0.1:8080/v1?page=2", "FIREWORKS_API_KEY", "MY_TINKER_KEY_2", "TINKER_API_KEY",
            "hf_token_for_project", "preftune-policy-1a2b3c4d", "offline-run-20240101_120000-a1b2c3d4e5f6",
            WANDB_KEY, "internationalization2024", "model-00001-of-00002.safetensors"]


@pytest.mark.parametrize("key", KEYS)
def test_keys_look_like_keys_and_are_masked_in_any_text(key: str) -> None:
    assert looks_like_secret(key) and looks_like_key(key)
    masked = mask_secrets(f"set the environment variable {key} to your API key")
    assert key not in masked and "***" in masked
    assert masked.startswith("set the environment variable ") and masked.endswith(" to your API key")


@pytest.mark.parametrize("value", ORDINARY)
def test_ordinary_values_are_not_masked(value: str) -> None:
    assert not looks_like_key(value)
    assert mask_secrets(f"error: {value}: not found") == f"error: {value}: not found"
    for key in ("base_model", "dataset", "tinker.base_url", "tokenizer_model"):
        assert mask_setting(key, value) == value


@pytest.mark.parametrize("name", ["FIREWORKS_API_KEY", "MY_TINKER_KEY_2", "hf_token_for_project"])
def test_variable_names_in_api_key_env_are_shown(name: str) -> None:
    assert mask_setting("fireworks.api_key_env", name) == name
    assert mask_setting("fireworks.api_key_env", "my key") == "***"  # not a name: never repeated


def test_a_w_and_b_key_counts_where_a_key_is_named_and_hashes_are_kept_elsewhere() -> None:
    assert looks_like_secret(WANDB_KEY) and not looks_like_key(WANDB_KEY)
    assert mask_setting("fireworks.api_key_env", WANDB_KEY) == "***"
    assert mask_setting("base_model_revision", WANDB_KEY) == WANDB_KEY  # a commit id


@pytest.mark.parametrize(("url", "shown"), [
    (f"http://user:{PASSWORD}@host:8000/v1", "http://user:***@host:8000/v1"),
    (f"https://alice:{PASSWORD}@api.example.com", "https://alice:***@api.example.com"),
    (f"https://{FW_KEY}@api.example.com/x", "https://***@api.example.com/x"),
    (f"https://api.example.com/x?api_key={PASSWORD}&page=2", "https://api.example.com/x?api_key=***&page=2"),
    ("https://user@api.example.com", "https://user@api.example.com"),
])
def test_the_secrets_of_urls_are_masked(url: str, shown: str) -> None:
    assert mask_secrets(f"cannot reach the service at {url}: refused") == (
        f"cannot reach the service at {shown}: refused")
    assert mask_setting("tinker.base_url", url) == shown


@pytest.mark.parametrize("key", ["api_key", "wandb.api_key", "hf_token", "x.password", "client_secret"])
def test_a_secret_settings_value_is_masked_whole_but_names_and_holders_are_not(key: str) -> None:
    assert mask_setting(key, "plain words") == "***"
    for name in ("tokenizer_model", "max_tokens", "fireworks.api_key_env", "token_file"):
        assert mask_setting(name, "plain") == "plain"


# --- the user's case: a key pasted into api_key_env ------------------------------------------

def write_config(tmp_path: Path, data: Path, backend: str, table: str, **top: Any) -> Path:
    lines = [f'base_model = "{top.pop("base_model", "builtin:tiny")}"', f'dataset = "{data}"',
             f'log_path = "{tmp_path / "run"}"', f'cache_dir = "{tmp_path / "cache"}"',
             f'backend = "{backend}"', "lora_rank = 4", *(f"{k} = {json.dumps(v)}" for k, v in top.items()),
             f"[{backend}]", table]
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize(("backend", "key", "hint", "example"), [
    ("fireworks", FW_KEY, "fw_…, 51 characters", "FIREWORKS_API_KEY"),
    ("tinker", "tml-" + FW_KEY[3:], "tml-…, 52 characters", "TINKER_API_KEY"),
    ("tinker", WANDB_KEY, "40 hex digits, as a W&B key", "TINKER_API_KEY"),
])
def test_a_key_in_api_key_env_is_refused_without_repeating_it(
        tmp_path: Path, small_dataset: Any, backend: str, key: str, hint: str, example: str) -> None:
    config = write_config(tmp_path, small_dataset(tmp_path / "d.jsonl"), backend, f'api_key_env = "{key}"')
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2
    assert key not in result.output
    assert (f"field '{backend}.api_key_env': holds what looks like an API key ({hint}): it takes the NAME "
            f"of the environment variable that holds the key, e.g. {example}") in result.output
    assert not (tmp_path / "run").exists()


def test_a_key_given_with_set_is_refused_and_never_repeated(tmp_path: Path, small_dataset: Any) -> None:
    config = write_config(tmp_path, small_dataset(tmp_path / "d.jsonl"), "fireworks", "")
    result = runner.invoke(app, ["run", str(config), "--set", f"fireworks.api_key_env={FW_KEY}"])
    assert result.exit_code == 2 and FW_KEY not in result.output
    assert result.output.startswith("error: --set fireworks.api_key_env=***: field 'fireworks.api_key_env': "
                                    "holds what looks like an API key (fw_…, 51 characters)")
    # quoted as TOML, and in a key the table does not have: neither is repeated either
    for item in (f'fireworks.api_key_env="{FW_KEY}"', f"wandb.api_key={FW_KEY}", f"wandb.api_key={PASSWORD}"):
        result = runner.invoke(app, ["run", str(config), "--set", item])
        secret = item.partition("=")[2].strip('"')
        assert result.exit_code == 2 and secret not in result.output, result.output
        assert f"--set {item.partition('=')[0]}=***" in result.output
    result = runner.invoke(app, ["run", str(config), "--set", FW_KEY])  # no key= at all
    assert result.exit_code == 2 and FW_KEY not in result.output and "expected key=value" in result.output
    assert not (tmp_path / "run").exists()


class SecretOptions:
    """A third party's plugin with a secret-named option of a strict type."""

    @hookimpl
    def register_sinks(self, register: Any) -> None:
        from pydantic import BaseModel, ConfigDict

        class Options(BaseModel):
            model_config = ConfigDict(extra="forbid")
            token: int = 0

        register("vault", lambda config, options: None, Options)


def test_a_secret_settings_wrong_value_is_not_repeated_in_the_validation_error() -> None:
    """pydantic's errors carry the input: the error says what is wrong, not the value."""
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(SecretOptions())
    config = load_config(None, ["base_model=builtin:tiny", "dataset=d", f"vault.token={FW_KEY[3:]}"])
    with pytest.raises(ConfigError) as error:
        config.check_plugin_tables(get_registry(pm))
    assert str(error.value).startswith("--set vault.token=***: field 'vault.token': Input should be a valid "
                                       "integer (known [vault] keys: token)")
    with pytest.raises(ConfigError) as error:
        Config(base_model="builtin:tiny", dataset="d", vault={"token": PASSWORD}).check_plugin_tables(
            get_registry(pm))
    assert PASSWORD not in str(error.value) and "field 'vault.token'" in str(error.value)


def test_with_a_users_defaults_a_pasted_key_is_never_printed(tmp_path: Path, small_dataset: Any) -> None:
    """``preftune run`` as a user runs it: the installed command, plugins found by their entry
    points, the cookbook's model, no test settings; the key is refused before anything loads."""
    config = write_config(tmp_path, small_dataset(tmp_path / "d.jsonl"), "fireworks",
                          f'api_key_env = "{FW_KEY}"', base_model="Qwen/Qwen2.5-0.5B-Instruct")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFTUNE_", "FIREWORKS_", "WANDB_"))}
    command = [str(Path(sys.executable).parent / "preftune"), "run", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert FW_KEY not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: field 'fireworks.api_key_env': holds what looks like an API key (fw_…, 51 characters): "
        "it takes the NAME of the environment variable that holds the key, e.g. FIREWORKS_API_KEY")
    assert files_holding(tmp_path, FW_KEY) == [config]


# --- passwords in URLs -------------------------------------------------------------------------

@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@pytest.mark.parametrize("backend", ["tinker", "fireworks"])
@pytest.mark.parametrize("given", ["config", "set", "env"])
def test_a_password_in_the_services_url_is_never_printed(
        tmp_path: Path, small_dataset: Any, closed_port: int, monkeypatch: pytest.MonkeyPatch,
        backend: str, given: str) -> None:
    url = f"http://user:{PASSWORD}@127.0.0.1:{closed_port}"
    monkeypatch.setenv(f"{backend.upper()}_API_KEY", "tml-test" if backend == "tinker" else "fw-test")
    table = f'base_url = "{url}"' if given == "config" else ""
    config = write_config(tmp_path, small_dataset(tmp_path / "d.jsonl"), backend, table)
    if given == "env":
        monkeypatch.setenv(f"{backend.upper()}_BASE_URL", url)
    sets = ["--set", f"{backend}.base_url={url}"] if given == "set" else []
    result = runner.invoke(app, ["run", str(config), *sets])
    assert result.exit_code == 2, result.output
    assert PASSWORD not in result.output
    assert f"cannot reach the service at http://user:***@127.0.0.1:{closed_port}" in result.output
    assert not (tmp_path / "run").exists()


def test_a_url_that_is_not_http_is_refused_without_its_password(tmp_path: Path, small_dataset: Any) -> None:
    config = write_config(tmp_path, small_dataset(tmp_path / "d.jsonl"), "tinker",
                          f'base_url = "ftp://user:{PASSWORD}@host"')
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2 and PASSWORD not in result.output
    assert "tinker.base_url = 'ftp://user:***@host' is not an http(s) URL" in result.output


def test_a_run_through_a_url_with_a_password_writes_it_nowhere(
        make_config: Any, emulator: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The whole run on the emulator: the SDK gets the URL as given; config.json, the reference
    cache, checkpoints and every message show it masked."""
    url = emulator.url.replace("http://", f"http://user:{PASSWORD}@")
    config = make_config(backend="tinker", lora_rank=4, checkpoint_interval=2, log_path=str(tmp_path / "run"),
                         tinker={"base_url": url, "timeout_s": 60}, sinks=["jsonl", "console"])
    summary = run(config)
    assert summary["status"] == "completed"
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["tinker"]["base_url"] == url.replace(PASSWORD, "***")
    assert len(list(tmp_path.rglob("*"))) > 10 and files_holding(tmp_path, PASSWORD) == []


# --- W&B ---------------------------------------------------------------------------------------

class Refuses(BaseHTTPRequestHandler):
    """A W&B server that refuses every request at once (401), noting the credentials it got."""

    seen: list[str | None] = []

    def _refuse(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"errors": [{"message": "unauthorized"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """W&B online, at ``http://user:PASSWORD@127.0.0.1:port`` of a server that refuses it."""
    wandb = pytest.importorskip("wandb")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://user:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
    wandb.teardown()
    for key, sub in (("WANDB_CACHE_DIR", "c"), ("WANDB_DATA_DIR", "d"), ("WANDB_CONFIG_DIR", "cfg")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-env" / sub))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    Refuses.seen = []
    yield url
    wandb.teardown()
    server.shutdown()


def test_passwords_in_wandb_base_url_and_in_the_w_and_b_config_go_nowhere(
        make_config: Any, tmp_path: Path, refusing_wandb: str, capfd: pytest.CaptureFixture[str]) -> None:
    """WANDB_BASE_URL's password is not passed to W&B (it signs in with its API key, and would
    print the URL and write it into its debug logs); a URL's password in the config reaches
    neither config.json nor W&B's config."""
    import wandb

    config = make_config(sinks=["jsonl", "wandb"], wandb={"init_timeout": 2.0},
                         tinker={"base_url": f"https://me:{PASSWORD}@tinker.example.com"})
    assert run(config)["status"] == "completed"  # offline, once the server refused it
    wandb.teardown()  # W&B's service flushes its files
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err and WANDB_KEY not in out + err
    assert "wandb: WANDB_BASE_URL holds a user name or password (http://user:***@127.0.0.1:" in err
    assert Refuses.seen and set(Refuses.seen) <= {None, basic_auth("api", WANDB_KEY)}
    written = json.loads((Path(config.log_path) / "config.json").read_text())
    assert written["tinker"]["base_url"] == "https://me:***@tinker.example.com"
    [run_file] = Path(config.log_path).glob("wandb/offline-run-*/run-*.wandb")
    assert b"https://me:***@tinker.example.com" in run_file.read_bytes()
    assert files_holding(tmp_path, PASSWORD) == [] and files_holding(tmp_path, WANDB_KEY) == []


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_resume_command_after_a_stop_does_not_repeat_a_password(
        tmp_path: Path, small_dataset: Any, config_file: Any) -> None:
    data = small_dataset(tmp_path / "data.jsonl")
    config = config_file(tmp_path / "c.toml", data, tmp_path / "logs", tmp_path / "cache", epochs=400,
                         checkpoint_interval=1000)
    url = f"https://me:{PASSWORD}@tinker.example.com"  # a table the local run validates, never uses
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "run", str(config), "--set", "seed=3",
                             "--set", f"tinker.base_url={url}"], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PREFTUNE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert PASSWORD not in out + err
    assert (f"resume with: preftune run {config} --set seed=3 --set 'tinker.base_url=https://me:***@"
            "tinker.example.com' --resume (*** stands for a secret you gave: give it again)") in err
    assert files_holding(tmp_path, PASSWORD) == []
