"""``[local] attn_implementation``: what ``auto`` picks, what is refused before anything loads
(naming the key), and that the model and a separate reference are loaded with the choice. That
the shortcuts change no number under each implementation that runs on the CPU is in
test_local_engine.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import ConfigError, run
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.plugins.local_attention import flex_backward_on_cpu, pick_attention, runnable
from preftune.plugins.local_engine import shared_unsupported
from preftune.tiny import tiny_config, tiny_model

ALL = {"sdpa", "eager", "flash_attention_2", "flex_attention"}


@pytest.mark.parametrize("layout, runs, expected", [
    ("auto", ALL, "sdpa"),  # the shared prompt needs a custom 4D mask: never flash
    ("shared", ALL, "sdpa"),
    ("padded", ALL, "flash_attention_2"),  # the rows flash attention is made for
    ("padded", {"sdpa", "eager", "flex_attention"}, "sdpa"),  # flex only when asked for
    ("auto", {"eager"}, "eager"),  # a model class without sdpa
    ("padded", set(), "eager"),
])
def test_auto_takes_the_first_implementation_that_runs_in_the_layouts_order(layout: str, runs: set[str],
                                                                            expected: str) -> None:
    assert pick_attention("auto", layout, runs) == expected


def test_an_implementation_asked_for_is_taken_as_it_is() -> None:
    assert pick_attention("eager", "auto", ALL) == "eager"
    assert pick_attention("flex_attention", "shared", set()) == "flex_attention"  # checked before


def test_on_this_cpu_sdpa_and_eager_run_and_flash_does_not() -> None:
    runs = runnable(tiny_config(), torch.device("cpu"), torch.float32)
    assert runs[:2] == ["sdpa", "eager"] and "flash_attention_2" not in runs
    assert ("flex_attention" in runs) == flex_backward_on_cpu()  # torch 2.13: no CPU backward
    assert pick_attention("auto", "auto", runs) == "sdpa"


def refused(config: Any, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        run(config)
    assert not Path(config.log_path).exists()


KEY = r"field 'local.attn_implementation': "


def test_flash_attention_without_a_gpu_is_refused_before_anything_loads(make_config: Any) -> None:
    refused(make_config(device="cpu", local={"attn_implementation": "flash_attention_2"}),
            KEY + r"'flash_attention_2' cannot train here: it runs on a CUDA device only \(device is cpu\)")


def test_flash_attention_with_the_shared_layout_is_refused(make_config: Any) -> None:
    refused(make_config(local={"attn_implementation": "flash_attention_2", "layout": "shared"}),
            KEY + r"'flash_attention_2' takes no custom 4D attention mask, which layout = 'shared' needs")


@pytest.mark.skipif(flex_backward_on_cpu(), reason="this torch has a FlexAttention backward on the CPU")
def test_flex_attention_on_the_cpu_is_refused_saying_why(make_config: Any) -> None:
    refused(make_config(device="cpu", local={"attn_implementation": "flex_attention"}),
            KEY + r"'flex_attention' cannot train here: torch .*'s FlexAttention has no backward pass on "
                  r"the CPU, and training needs one; use sdpa or eager")


def test_an_implementation_the_model_class_lacks_is_refused(make_config: Any, tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(vocab_size=400, n_embd=32, n_layer=1, n_head=2, n_positions=128).save_pretrained(
        tmp_path / "gpt2")
    refused(make_config(base_model=str(tmp_path / "gpt2"), local={"attn_implementation": "flex_attention"}),
            KEY + r"'flex_attention' cannot train here: model class GPT2LMHeadModel does not implement it")


def test_flash_attention_takes_no_shared_layout_and_the_calibration_says_why() -> None:
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"  # what a model loaded with it holds
    assert "'flash_attention_2' takes no custom 4D masks (sdpa, eager and flex_attention do)" in \
        shared_unsupported(model, 256)


@pytest.mark.parametrize("requested, said", [("auto", "attention sdpa (auto)"), ("eager", "attention eager")])
def test_the_policy_and_a_separate_reference_load_with_the_choice_said_once(
        make_config: Any, tokenizer: Any, capsys: Any, requested: str, said: str) -> None:
    backend = LocalBackend(make_config(device="cpu"), LocalOptions(attn_implementation=requested), tokenizer)
    name = said.split()[1]
    assert backend.model.config._attn_implementation == name
    assert backend.identity()["attention"] == name  # the reference cache's key: kernels round differently
    assert backend.plan.layout == "shared"  # both take the shared prompt's 4D mask
    reference = backend.reference_client(shared=False)
    assert reference.engine.model.config._attn_implementation == name
    assert capsys.readouterr().err.count(f"local backend: {said}\n") == 1
    reference.close()
    backend.close()
