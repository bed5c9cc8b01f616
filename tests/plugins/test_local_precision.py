"""``[local] precision`` on the real tiny model: what is stored and computed in which dtype,
updates at DPO's learning rates, learning, loss scaling, exact resume, calibration, float32 numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import (
    AdamParams,
    Config,
    ConfigError,
    Message,
    PreferencePair,
    TrainingError,
    get_plugin_manager,
    hookimpl,
    run,
    tokenize_pair,
)
from preftune.config import load_config
from preftune.loop import BoundLoss, optimizer_step
from preftune.plugins.dpo import DPOLoss
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.plugins.local_engine import calibrate, chunked_logps, target_logps, token_logps
from preftune.plugins.local_precision import PRECISIONS
from preftune.tiny import tiny_model
from preftune.types import resolve

MIXED = ["bf16-mixed", "fp16-mixed"]


def make_pairs(tokenizer: Any, n: int = 4) -> list[Any]:
    return [tokenize_pair(tokenizer, PreferencePair(
        (Message("user", f"Question {i}: is {i} even?"),),
        (Message("assistant", "yes" if i % 2 == 0 else "no"),),
        (Message("assistant", "maybe " * (i + 1)),)), 128) for i in range(n)]


def backend(tokenizer: Any, precision: str, **config: Any) -> LocalBackend:
    cfg = Config(base_model="builtin:tiny", dataset="unused", device="cpu", **config)
    return LocalBackend(cfg, LocalOptions(precision=precision), tokenizer)


def train(b: LocalBackend, pairs: list[Any], ref: Any, steps: int, lr: float) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for _ in range(steps):
        b.forward_backward(pairs, BoundLoss(DPOLoss(0.1), ref, 1.0))
        metrics = resolve(b.optim_step(AdamParams(lr)))
    return metrics


def changed_fraction(b: LocalBackend, before: list[torch.Tensor], compensated: bool = False) -> float:
    """Share of trainable elements that moved; ``compensated``: counting what Kahan summation
    holds back (the weight plus its compensation, the value the weight is converging to)."""
    moved = total = 0
    for param, old in zip(b.params, before):
        now = param.detach().float()
        if compensated:
            now = now + b.optimizer.state[param]["compensation"].float()
        moved, total = moved + int((now != old).sum()), total + old.numel()
    return moved / total


def test_dpo_learning_rate_updates_are_kept_in_every_precision(tokenizer: Any) -> None:
    """lr 5e-7, 20 steps of a full fine-tune: a plain bfloat16 AdamW rounds most updates away;
    bf16-mixed (float32 masters) and bf16-true (Kahan summation) keep them."""
    pairs = make_pairs(tokenizer)
    fractions = {}
    for name in ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed"):
        b = backend(tokenizer, name)
        ref = b.reference_client(shared=False).forward(pairs)
        before = [p.detach().float().clone() for p in b.params]
        train(b, pairs, ref, 20, 5e-7)
        fractions[name] = changed_fraction(b, before, compensated=name == "bf16-true")
        if name == "bf16-true":
            fractions["bf16-true weights"] = changed_fraction(b, before)
    plain = backend(tokenizer, "bf16-true")  # what [local] dtype = "bfloat16" did: no compensation
    plain.stepper.optimizer = torch.optim.AdamW(plain.params, lr=5e-7, fused=True)
    ref = plain.reference_client(shared=False).forward(pairs)
    before = [p.detach().float().clone() for p in plain.params]
    train(plain, pairs, ref, 20, 5e-7)
    fractions["bf16 plain AdamW"] = changed_fraction(plain, before)
    assert fractions["fp32"] > 0.9
    for name in ("bf16-mixed", "fp16-mixed", "bf16-true"):
        assert fractions[name] >= fractions["fp32"] / 2, fractions
    # the compensated weights move far more than plain bfloat16 ones (the rest waits in the buffer)
    assert fractions["bf16-true weights"] > 4 * fractions["bf16 plain AdamW"], fractions


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_each_precision_learns_the_preference(make_config: Any, precision: str) -> None:
    summary = run(make_config(epochs=6, learning_rate=3e-3, beta=0.5, device="cpu",
                              local={"precision": precision}))
    assert summary["final_eval"]["eval_accuracy"] >= 0.9
    assert summary["final_eval"]["eval_margin"] > summary["initial_eval"]["eval_margin"] + 1
    # the reference is the policy before its first step, exactly: the loss starts at ln 2
    assert summary["initial_eval"]["eval_margin"] == 0 and summary["initial_eval"]["eval_accuracy"] == 0
    assert summary["initial_eval"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_what_is_stored_in_which_dtype(tokenizer: Any) -> None:
    full = backend(tokenizer, "bf16-mixed")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}  # all of it trains
    reference = full.reference_client(shared=False)  # stored as the policy is: equal at step 0
    assert {p.dtype for p in reference.engine.model.parameters()} == {torch.float32}
    pairs = make_pairs(tokenizer)
    torch.testing.assert_close(reference.forward(pairs).chosen, full.forward(pairs).chosen, rtol=0, atol=0)
    lora = backend(tokenizer, "bf16-mixed", lora_rank=4)
    assert {p.dtype for p in lora.params} == {torch.float32}
    assert {p.dtype for p in lora.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    true = backend(tokenizer, "bf16-true", lora_rank=4)
    assert {p.dtype for p in true.model.parameters()} == {torch.bfloat16}
    assert {type(true.optimizer).__name__, type(lora.optimizer).__name__} == {"KahanAdamW", "AdamW"}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_log_probs_losses_metrics_and_references_are_float32(tokenizer: Any, precision: str) -> None:
    pairs = make_pairs(tokenizer)
    b = backend(tokenizer, precision, lora_rank=4)
    ref = b.reference_client(shared=True).forward(pairs)
    policy = b.forward(pairs, token_logps=True)
    assert {policy.tokens.chosen_BT.dtype, policy.tokens.rejected_BT.dtype} == {torch.float32}
    for numbers in (ref, policy):
        assert {numbers.chosen.dtype, numbers.rejected.dtype} == {torch.float32}
    metrics = b.forward_backward(pairs, BoundLoss(DPOLoss(0.1), ref, 1.0))
    assert {v.dtype for v in metrics.values()} == {torch.float32}
    assert set(resolve(b.optim_step(AdamParams(1e-3)))) >= {"grad_norm"}


def test_the_output_layer_under_autocast_takes_its_log_softmax_in_float32() -> None:
    head = torch.nn.Linear(16, 300, bias=False)
    hidden, targets = torch.randn(40, 16), torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_logps(head, hidden, targets, chunk=8)
        logits = head(hidden)
    assert chunked.dtype == logits.float().dtype == torch.float32 and logits.dtype == torch.bfloat16
    exact = logits.float().gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits.float(), -1)
    torch.testing.assert_close(chunked, exact, rtol=0, atol=0)
    torch.testing.assert_close(token_logps(logits, targets), exact, rtol=0, atol=0)


def wider_qwen3() -> Any:
    """A Qwen3 wide enough that float16 rounding differs between the layouts (by ~4e-4 on the CPU)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, attn_implementation="sdpa")).eval()


@pytest.mark.parametrize("build, compute", [(tiny_model, torch.bfloat16), (tiny_model, torch.float16),
                                            (wider_qwen3, torch.float16)])
def test_calibration_keeps_the_shared_layout_under_autocast(build: Any, compute: torch.dtype) -> None:
    """The start-up check runs under training's autocast and allows its dtype's rounding (the
    float32 weights' tolerance would send the wider model to the padded layout)."""
    model = build()
    plan = calibrate(model, torch.device("cpu"), "auto", 64, 128, compute)
    assert plan.layout == "shared" and plan.split_head and not plan.notes
    from preftune.layout import padded_layout
    from preftune.plugins.local_engine import Plan, probe_pairs, vocab_size

    with torch.inference_mode():  # the check's numbers are the autocast ones, not float32's
        layout = padded_layout(probe_pairs(min(vocab_size(model), 1000)))
        exact = target_logps(model, layout, Plan("padded", True, 64, []))
        with torch.autocast("cpu", dtype=compute):
            mixed = target_logps(model, layout, Plan("padded", True, 64, []))
    assert (mixed - exact).abs().max() > 1e-4


def test_the_reference_cache_key_follows_the_compute_and_weights_dtypes(tokenizer: Any) -> None:
    """A LoRA base is computed the same way under bf16-mixed and bf16-true (one key); a full
    fine-tune's reference, stored as its policy, differs between them (two keys)."""
    pairs = make_pairs(tokenizer)
    keys, numbers = {}, {}
    for lora in (0, 4):
        for name in PRECISIONS:
            b = backend(tokenizer, name, lora_rank=lora)
            keys[name, lora] = (b.identity()["dtype"], b.identity()["weights_dtype"])
            numbers[name, lora] = b.reference_client(shared=lora > 0).forward(pairs).chosen
    assert keys == {("fp32", 0): ("float32", "float32"), ("bf16-mixed", 0): ("bfloat16", "float32"),
                    ("bf16-true", 0): ("bfloat16", "bfloat16"), ("fp16-mixed", 0): ("float16", "float32"),
                    ("fp32", 4): ("float32", "float32"), ("bf16-mixed", 4): ("bfloat16", "bfloat16"),
                    ("bf16-true", 4): ("bfloat16", "bfloat16"), ("fp16-mixed", 4): ("float16", "float16")}
    torch.testing.assert_close(numbers["bf16-mixed", 4], numbers["bf16-true", 4], rtol=0, atol=0)
    assert not torch.equal(numbers["bf16-mixed", 0], numbers["bf16-true", 0])
    assert not torch.equal(numbers["fp32", 0], numbers["bf16-mixed", 0])


def test_an_fp16_overflow_is_a_skipped_step_counted_not_an_error(tokenizer: Any) -> None:
    pairs = make_pairs(tokenizer)
    b = backend(tokenizer, "fp16-mixed")
    ref = b.reference_client(shared=False).forward(pairs)
    b.stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # float16 gradients overflow
    before = [p.detach().clone() for p in b.params]
    out = b.forward_backward(pairs, BoundLoss(DPOLoss(0.1), ref, 1.0))
    row = optimizer_step(b, [(out, 1.0)], AdamParams(1e-3), 1, pairs)  # not an error
    assert row["step_skipped"] == 1.0 and "grad_norm" not in row and math.isfinite(row["loss"])
    assert b.summary() == {"precision": "fp16-mixed", "skipped_steps": 1}
    assert all(torch.equal(a, p) for a, p in zip(before, b.params))
    for state in b.optimizer.state.values():  # AdamW counted no step and moved no moment
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert b.stepper.scaler.get_scale() == 2.0**99  # the scaler backs off
    b.stepper.scaler.update(new_scale=2.0**10)
    metrics = train(b, pairs, ref, 1, 1e-3)
    assert metrics["step_skipped"] == 0.0 and metrics["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, b.params)) and b.summary()["skipped_steps"] == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_a_non_finite_gradient_is_never_applied(tokenizer: Any, precision: str) -> None:
    pairs = make_pairs(tokenizer)
    b = backend(tokenizer, precision)
    ref = b.reference_client(shared=False).forward(pairs)
    train(b, pairs, ref, 1, 1e-3)  # optimizer state exists
    before = [p.detach().clone() for p in b.params]
    state = json.dumps({k: {n: v.tolist() for n, v in s.items()}
                        for k, s in b.optimizer.state_dict()["state"].items()})
    out = b.forward_backward(pairs, BoundLoss(DPOLoss(0.1), ref, float("nan")))
    with pytest.raises(TrainingError, match=r"^gradient norm is nan at step 2; the step was not applied"):
        optimizer_step(b, [(out, 1.0)], AdamParams(1e-3), 2, pairs)
    assert all(torch.equal(a, p) for a, p in zip(before, b.params))
    assert json.dumps({k: {n: v.tolist() for n, v in s.items()}
                       for k, s in b.optimizer.state_dict()["state"].items()}) == state


class Stopper:
    @hookimpl
    def preftune_log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if step == 5:
            raise KeyboardInterrupt


class StopperPlugin:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("stopper", lambda config, options: Stopper())


def rows(path: Path) -> list[dict[str, Any]]:
    machine = ("tokens_per_s", "elapsed_s", "peak_mem_mb")
    return [{k: v for k, v in json.loads(line).items() if k not in machine}
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_resume_is_exact_in_every_precision(make_config: Any, tmp_path: Path, precision: str) -> None:
    common = {"epochs": 2, "checkpoint_interval": 3, "device": "cpu", "local": {"precision": precision},
              "lora_rank": 4 if precision == "bf16-true" else 0}
    full = make_config(log_path=str(tmp_path / "full"), **common)
    run(full)
    part = make_config(log_path=str(tmp_path / "part"), **common)
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(StopperPlugin())
    with pytest.raises(KeyboardInterrupt):  # after step 5, checkpoint at 3
        run(part.model_copy(update={"sinks": ["jsonl", "stopper"]}), pm)
    run(part.model_copy(update={"resume": True}))
    assert rows(tmp_path / "full" / "metrics.jsonl") == rows(tmp_path / "part" / "metrics.jsonl")
    from safetensors.torch import load_file

    files = sorted((tmp_path / "full" / "final").glob("*.safetensors"))
    assert files
    for file in files:
        expected, got = load_file(str(file)), load_file(str(tmp_path / "part" / "final" / file.name))
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_loss_scale_and_the_skipped_count_are_saved_with_the_state(tokenizer: Any,
                                                                       tmp_path: Path) -> None:
    pairs = make_pairs(tokenizer)
    a = backend(tokenizer, "fp16-mixed")
    ref = a.reference_client(shared=False).forward(pairs)
    a.stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    train(a, pairs, ref, 2, 1e-3)  # both skipped: the scale backs off twice
    a.save_state(str(tmp_path / "state"))
    b = backend(tokenizer, "fp16-mixed")
    b.load_state(str(tmp_path / "state"))
    assert b.stepper.scaler.state_dict() == a.stepper.scaler.state_dict()
    assert b.stepper.scaler.get_scale() == 2.0**98 and b.summary()["skipped_steps"] == 2
    (tmp_path / "state" / "scaler.pt").unlink()
    with pytest.raises(ConfigError, match="lacks scaler.pt"):
        backend(tokenizer, "fp16-mixed").load_state(str(tmp_path / "state"))


def test_auto_is_fp32_on_the_cpu_and_the_run_says_so(tokenizer: Any, capsys: Any) -> None:
    b = LocalBackend(Config(base_model="builtin:tiny", dataset="unused", device="cpu"), LocalOptions(),
                     tokenizer)
    assert b.precision.name == "fp32" and b.summary() == {"precision": "fp32"}
    assert "local backend: precision fp32 (auto)" in capsys.readouterr().err


@pytest.mark.parametrize("value, replacement", [
    ("bfloat16", "precision = 'bf16-true' (or 'bf16-mixed')"),
    ("float16", "precision = 'fp16-mixed'"),
    ("float32", "precision = 'fp32'"),
])
def test_the_old_dtype_option_says_what_replaced_it(tmp_path: Path, registry: Any, value: str,
                                                    replacement: str) -> None:
    config = load_config(None, ['base_model="builtin:tiny"', "dataset=d", f"local.dtype={value}"])
    with pytest.raises(ConfigError) as info:
        config.check_plugin_tables(registry)
    assert str(info.value).startswith(
        f"--set local.dtype={value}: field 'local.dtype': [local] dtype was replaced by precision: "
        f"dtype = {value!r} -> {replacement}")
    file = tmp_path / "c.toml"
    file.write_text(f'base_model = "builtin:tiny"\ndataset = "d"\n[local]\ndtype = "{value}"\n')
    with pytest.raises(ConfigError, match=r"field 'local.dtype': \[local\] dtype was replaced by precision"):
        load_config(file).check_plugin_tables(registry)


def test_float16_on_a_cpu_is_said_to_be_slow(tokenizer: Any, capsys: Any) -> None:
    backend(tokenizer, "fp16-mixed")
    backend(tokenizer, "bf16-mixed")
    said = [line for line in capsys.readouterr().err.splitlines() if "precision" in line]
    assert said[0].startswith("[preftune] local backend: precision fp16-mixed; float16 on a CPU has no fast")
    assert said[1] == "[preftune] local backend: precision bf16-mixed"
