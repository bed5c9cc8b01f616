"""Values the run cannot use are refused before anything loads and before the log directory is
created, naming the key and what is allowed (issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError, get_plugin_manager, get_registry, hookimpl, load_config, run


def refused(config: Any, pattern: str, pm: Any = None) -> None:
    """``run(config)`` fails with ``pattern`` and leaves no log directory behind."""
    with pytest.raises(ConfigError, match=pattern):
        run(config, pm)
    assert not Path(config.log_path).exists()


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "cuda0", "meta"])
def test_a_device_name_the_backend_cannot_use_lists_the_allowed_ones(make_config: Any, device: str) -> None:
    refused(make_config(device=device), rf"field 'device': '{device}' is not a device the local "
                                        r"backend can use; allowed: auto, cpu, cuda, cuda:N, mps")


def test_a_device_this_machine_lacks_is_refused_saying_what_it_has(make_config: Any) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last, or CUDA on a CPU machine
    refused(make_config(device=missing), rf"'{missing}' asked for, but this machine has (no CUDA device; "
                                         r"use auto or cpu|\d+ CUDA device\(s\): cuda:0 to cuda:\d+)")
    if not torch.backends.mps.is_available():
        refused(make_config(device="mps"), "'mps' asked for, but this machine has no MPS device")


def test_max_seq_len_beyond_the_models_context_is_refused(make_config: Any, registry: Any) -> None:
    refused(make_config(max_seq_len=257), r"field 'max_seq_len': 257 is beyond the context of model "
                                          r"'builtin:tiny' \(max_position_embeddings = 256\); "
                                          r"allowed: 2 to 256")
    registry.check("backend", "local", make_config(max_seq_len=256))  # the whole context is fine


def test_the_default_max_seq_len_is_lowered_to_the_models_context(tmp_path: Path, capsys: Any) -> None:
    config_file = tmp_path / "c.toml"  # no max_seq_len: the default (4096) is more than tiny's 256
    config_file.write_text('base_model = "builtin:tiny"\ndataset = "d.jsonl"\n')
    config = load_config(config_file)
    get_registry(get_plugin_manager(load_entrypoints=False)).check("backend", "local", config)
    assert config.max_seq_len == 256
    assert "the default 4096 is beyond the context of model 'builtin:tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("targets, problem", [
    (["qproj"], r"'qproj' matches no module"),
    (["q_proj", "v_porj"], r"'v_porj' matches no module"),  # peft alone would ignore it
    ("q_proj", r"'q_proj' matches no module"),  # a string is a regex over whole names
    (["layers.0"], r"'layers.0' matches 'model.layers.0', a Qwen3DecoderLayer, which LoRA cannot wrap"),
])
def test_lora_target_modules_matching_nothing_list_the_models_modules(make_config: Any, targets: Any,
                                                                      problem: str) -> None:
    refused(make_config(lora_rank=4, local={"lora_target_modules": targets}),
            rf"field 'local.lora_target_modules': {problem}; the layers of model 'builtin:tiny' LoRA "
            r"can target: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
            r"v_proj \(or 'all-linear'")


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], r".*\.(q|v)_proj"])
def test_lora_targets_that_match_pass_the_check(make_config: Any, registry: Any, targets: Any) -> None:
    registry.check("backend", "local", make_config(lora_rank=4, local={"lora_target_modules": targets}))


@pytest.mark.parametrize("key, value, pattern", [
    ("base_model", "./models/mine", r"field 'base_model': model './models/mine': no such directory"),
    ("base_model", "models/a/b", r"field 'base_model': model 'models/a/b': no such directory"),
    ("base_model", "{data}", r"field 'base_model': model '.*data.jsonl' is a file; a local model is a "
                             r"directory"),
    ("base_model", "nobody/no-such-model", r"field 'base_model': cannot load model "
                                           r"'nobody/no-such-model': not a local model directory"),
    ("init_from", "./runs/nothing", r"field 'init_from': init_from './runs/nothing' is not a preftune "
                                    r"checkpoint"),
    ("tokenizer_model", "/no/tokenizer", r"tokenizer_model '/no/tokenizer': no such directory"),
    ("dataset", "/no/data.jsonl", r"dataset /no/data.jsonl: No such file or directory"),
    ("dataset", "{dir}", r"dataset .*: no data source reads this directory; sources: arrow, hf, json"),
    ("eval_dataset", "/no/held.jsonl", r"eval_dataset /no/held.jsonl: No such file or directory"),
])
def test_a_path_that_does_not_exist_is_refused_before_the_log_directory(
    make_config: Any, tmp_path: Path, key: str, value: str, pattern: str
) -> None:
    config = make_config()
    refused(make_config(**{key: value.format(data=config.dataset, dir=tmp_path)}), pattern)


def test_bad_values_given_with_set_name_the_set(tmp_path: Path, small_dataset: Any) -> None:
    data = small_dataset(tmp_path / "d.jsonl")
    config = load_config(None, ["base_model=builtin:tiny", f"dataset={data}", f"log_path={tmp_path / 'l'}",
                                "device=cuda:x"])
    refused(config, r"^--set device=cuda:x: field 'device': 'cuda:x' is not a device")


def test_an_eval_fraction_that_takes_every_pair_says_the_split_took_them(make_config: Any) -> None:
    with pytest.raises(ConfigError, match=r"eval_fraction = 0.9 holds out 2 of the 2 pairs of .*data\.jsonl, "
                                          r"leaving none to train on; lower eval_fraction, or set "
                                          r"eval_dataset"):
        run(make_config(max_pairs=2, eval_fraction=0.9))


class CheckedBackend:
    """A third-party backend whose factory checks the settings first (and never builds)."""

    checked: list[str] = []

    @staticmethod
    def check(config: Any, options: Any) -> None:
        CheckedBackend.checked.append(config.base_model)
        raise ConfigError("field 'base_model': the remote service has no such model")

    def __init__(self, config: Any, options: Any, tokenizer: Any):
        raise AssertionError("built although its check refused the settings")


class CheckedPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register("checked", CheckedBackend)


def test_a_backends_check_runs_before_anything_loads(make_config: Any) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(CheckedPlugin())
    refused(make_config(backend="checked"), "the remote service has no such model", pm)
    assert CheckedBackend.checked == ["builtin:tiny"]
    get_registry(pm).check("backend", "local", make_config())  # the built-in passes its own
