"""LoRA in the local backend on the real tiny model: dropout in training steps only (and exact
resume with it), and the adapter merged into a plain Hugging Face model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preftune import (
    Config,
    ConfigError,
    Message,
    PreferencePair,
    get_plugin_manager,
    hookimpl,
    run,
    tokenize_pair,
)
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.tiny import tiny_model


def make_pairs(tokenizer: Any, n: int = 4) -> list[Any]:
    out = []
    for i in range(n):
        pair = PreferencePair((Message("user", f"Question {i}: is {i} even?"),),
                              (Message("assistant", "yes" if i % 2 == 0 else "no"),),
                              (Message("assistant", "maybe " * (i + 1)),))
        out.append(tokenize_pair(tokenizer, pair, 128))
    return out


def backend(tokenizer: Any, options: dict[str, Any] | None = None, **config: Any) -> LocalBackend:
    cfg = Config(base_model="builtin:tiny", dataset="unused", device="cpu", **{"lora_rank": 4, **config})
    return LocalBackend(cfg, LocalOptions(**(options or {})), tokenizer)


def randomize_adapter(b: LocalBackend) -> None:
    """LoRA's B starts at zero, where dropout on A's input changes nothing: give it values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in b.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


class Record:
    """A loss that keeps the training forward's log-probs."""

    needs_token_logps = False

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, policy: Any) -> Any:
        self.seen.append(policy.chosen.detach().clone())
        return -policy.chosen.sum(), {}


def training_logps(b: LocalBackend, pairs: list[Any]) -> torch.Tensor:
    record = Record()
    b.forward_backward(pairs, record)
    return record.seen[0]


def test_lora_dropout_is_on_in_training_steps_only(tokenizer: Any) -> None:
    b = backend(tokenizer, {"lora_dropout": 0.3})
    randomize_adapter(b)
    pairs = make_pairs(tokenizer)
    first, second = training_logps(b, pairs), training_logps(b, pairs)
    assert not torch.allclose(first, second, atol=1e-4)  # a new mask each step
    evaluation = b.forward(pairs)
    torch.testing.assert_close(b.forward(pairs).chosen, evaluation.chosen, rtol=0, atol=0)
    assert not torch.allclose(first, evaluation.chosen, atol=1e-4)
    assert not any(m.training for m in b.model.modules())  # all back in eval mode
    reference = b.reference_client(shared=True).forward(pairs)  # the base, adapter off
    base = backend(tokenizer, lora_rank=0).forward(pairs)
    torch.testing.assert_close(reference.chosen, base.chosen, rtol=0, atol=1e-6)


def test_without_dropout_a_training_forward_is_the_evaluation_forward(tokenizer: Any,
                                                                     tmp_path: Path) -> None:
    """Also for a warm-start adapter trained with dropout: this run's lora_dropout (0) rules."""
    trained = backend(tokenizer, {"lora_dropout": 0.3})
    randomize_adapter(trained)
    trained.save_weights(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    b = backend(tokenizer, init_from=str(tmp_path / "adapter"))
    pairs = make_pairs(tokenizer)
    torch.testing.assert_close(training_logps(b, pairs), b.forward(pairs).chosen, rtol=0, atol=1e-6)
    assert b.lora_dropouts == []


def test_activation_checkpointing_redraws_the_same_masks_in_the_backward(tokenizer: Any) -> None:
    pairs = make_pairs(tokenizer)

    def gradient(checkpointing: bool) -> torch.Tensor:
        b = backend(tokenizer, {"lora_dropout": 0.3, "activation_checkpointing": checkpointing})
        randomize_adapter(b)
        torch.manual_seed(7)
        training_logps(b, pairs)
        return torch.cat([p.grad.flatten() for p in b.params])

    torch.testing.assert_close(gradient(True), gradient(False), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("option", [{"lora_dropout": 0.1}, {"merge_lora": True}])
def test_lora_options_without_lora_are_refused_before_loading(make_config: Any,
                                                              option: dict[str, Any]) -> None:
    config = make_config(local=option)
    [key] = option
    with pytest.raises(ConfigError, match=rf"field 'local.{key}': .* lora_rank is 0"):
        run(config)
    assert not Path(config.log_path).exists()


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_lora_dropout_out_of_range_is_refused(make_config: Any, value: float) -> None:
    with pytest.raises(ConfigError, match="local.lora_dropout"):
        run(make_config(lora_rank=4, local={"lora_dropout": value}))


class Stopper:
    """A sink that interrupts the run after step 7."""

    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == 7:
            raise KeyboardInterrupt


class StopperPlugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("stopper", lambda config, options: Stopper())


def test_resume_with_lora_dropout_is_exact(make_config: Any, tmp_path: Path) -> None:
    common = {"lora_rank": 4, "local": {"lora_dropout": 0.2}, "learning_rate": 1e-2, "epochs": 2,
              "checkpoint_interval": 5}  # 18 training pairs, 4 a step: 10 steps
    full = make_config(log_path=str(tmp_path / "full"), **common)
    run(full)
    part = make_config(log_path=str(tmp_path / "part"), **common)
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(StopperPlugin())
    with pytest.raises(KeyboardInterrupt):  # after step 7: resumes from the checkpoint of step 5
        run(part.model_copy(update={"sinks": ["jsonl", "stopper"]}), pm)
    run(part.model_copy(update={"resume": True}))
    final = {name: load_file(str(tmp_path / name / "final" / "adapter_model.safetensors"))
             for name in ("full", "part")}
    assert final["full"].keys() == final["part"].keys()
    for key, tensor in final["full"].items():
        assert torch.equal(tensor, final["part"][key]), key


def sequence_logps(model: Any, pairs: list[Any]) -> torch.Tensor:
    """Each chosen and rejected sequence's next-token log-probs, one sequence at a time."""
    out = []
    with torch.no_grad():
        for pair in pairs:
            for side in ("chosen", "rejected"):
                tokens, _ = pair.sequence(side)
                logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None]))
    return torch.cat(out)


def test_a_run_with_merge_lora_writes_a_plain_model_equal_to_base_plus_adapter(
        make_config: Any, tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(lora_rank=4, learning_rate=2e-2, local={"merge_lora": True})
    final = Path(run(config)["weights"])
    merged = final / "merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any("adapter" in name for name in names)
    alone = AutoModelForCausalLM.from_pretrained(merged)  # transformers alone, no peft
    assert alone.dtype == torch.float32 and not hasattr(alone, "peft_config")
    assert AutoTokenizer.from_pretrained(merged).chat_template == tokenizer.chat_template
    pairs = make_pairs(tokenizer)
    with_adapter = sequence_logps(PeftModel.from_pretrained(tiny_model(), final).eval(), pairs)
    torch.testing.assert_close(sequence_logps(alone.eval(), pairs), with_adapter, rtol=0, atol=1e-5)
    assert not torch.allclose(sequence_logps(tiny_model().eval(), pairs), with_adapter, atol=1e-3)


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], ["lm_head", "v_proj"]])
def test_merging_leaves_the_policy_unchanged(tokenizer: Any, tmp_path: Path, targets: list[str]) -> None:
    """Also when LoRA adapts the output layer of a model whose embeddings are tied to it: the
    merged model then holds both, untied."""
    from transformers import AutoModelForCausalLM

    b = backend(tokenizer, {"merge_lora": True, "lora_target_modules": targets})
    randomize_adapter(b)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    pairs = make_pairs(tokenizer)
    logps = sequence_logps(b.model, pairs)
    b.save_weights(str(tmp_path / "final"))
    assert all(torch.equal(before[k], v) for k, v in b.model.state_dict().items())
    alone = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged").eval()
    torch.testing.assert_close(sequence_logps(alone, pairs), logps, rtol=0, atol=1e-5)
    assert alone.config.tie_word_embeddings == ("lm_head" not in targets)


def test_a_bf16_mixed_run_merges_in_float32_into_its_bfloat16_base(tokenizer: Any, tmp_path: Path) -> None:
    b = backend(tokenizer, {"merge_lora": True, "precision": "bf16-mixed", "lora_target_modules": ["q_proj"]})
    randomize_adapter(b)
    b.save_weights(str(tmp_path / "final"))
    merged = load_file(str(tmp_path / "final" / "merged" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    layer = b.model.get_base_model().model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).bfloat16()
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoints_hold_the_cuda_generators_for_dropout_on_a_gpu() -> None:
    from preftune.checkpoint import rng_state, set_rng_state

    torch.rand(1, device="cuda")
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    drawn = torch.rand(8, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), drawn)


def test_merge_lora_may_change_on_resume(registry: Any) -> None:
    """It says what is written at the end, not what is trained: not in the training hash."""
    assert "local.merge_lora" in registry.operational_keys()
    assert "local.lora_dropout" not in registry.operational_keys()


def test_export_merges_onto_the_model_the_adapter_was_trained_on(tmp_path: Path, tokenizer: Any) -> None:
    from preftune.plugins.local_lora import base_of

    def config(**settings: Any) -> Config:
        return Config(base_model="builtin:tiny", base_model_revision="v1", dataset="d", lora_rank=4,
                      **settings)

    tiny_model().save_pretrained(tmp_path / "sft")
    backend(tokenizer).save_weights(str(tmp_path / "adapter"))
    assert base_of(config()) == ("builtin:tiny", "v1")
    assert base_of(config(init_from=str(tmp_path / "sft"))) == (str(tmp_path / "sft"), None)
    assert base_of(config(init_from=str(tmp_path / "adapter"))) == ("builtin:tiny", "v1")
    with pytest.raises(ConfigError, match="the run's init_from: init_from .* is not a preftune"):
        base_of(config(init_from=str(tmp_path)))
