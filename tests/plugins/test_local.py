"""The local backend on the real tiny model: log-probs, references, steps, saved weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import AdamParams, Config, Message, PairLogps, PreferencePair, tokenize_pair
from preftune.loop import BoundLoss, optimizer_step
from preftune.plugins.dpo import DPOLoss
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.types import resolve


def make_pairs(tokenizer: Any, n: int = 6) -> list[Any]:
    out = []
    for i in range(n):
        pair = PreferencePair((Message("user", f"Question {i}: is {i} even?"),),
                              (Message("assistant", "yes" if i % 2 == 0 else "no"),),
                              (Message("assistant", "maybe " * (i + 1)),))
        out.append(tokenize_pair(tokenizer, pair, 128))
    return out


def backend(tokenizer: Any, layout: str = "auto", **config: Any) -> LocalBackend:
    cfg = Config(base_model="builtin:tiny", dataset="unused", device="cpu", **config)
    return LocalBackend(cfg, LocalOptions(layout=layout), tokenizer)


def sums(model: Any, pair: Any, side: str) -> float:
    """Summed completion log-probs of one sequence, computed alone (no padding, no sharing)."""
    tokens, weights = pair.sequence(side)
    return float((manual_logps(model, tokens) * torch.tensor(weights)).sum())


class Fn:
    """A loss function for ``forward_backward``: ``fn(policy) -> (loss, metrics)``."""

    needs_token_logps = False

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, policy: PairLogps) -> Any:
        return self.fn(policy), {}


def manual_logps(model: Any, tokens: list[int]) -> torch.Tensor:
    """Log-prob of each next token, one sequence at a time, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.mark.parametrize("layout", ["shared", "padded"])
def test_batched_logps_equal_unpadded_per_sequence_logps(tokenizer: Any, layout: str) -> None:
    b = backend(tokenizer, layout)
    assert b.plan.layout == layout
    pairs = make_pairs(tokenizer)
    logps = b.forward(pairs)
    for i, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            assert float(getattr(logps, side)[i]) == pytest.approx(sums(b.model, pair, side), abs=1e-4)
            assert float(getattr(logps, f"{side}_tokens")[i]) == len(getattr(pair, side))


def test_separate_reference_equals_the_untrained_policy(tokenizer: Any) -> None:
    b = backend(tokenizer)
    pairs = make_pairs(tokenizer)
    client = b.reference_client(shared=False)
    torch.testing.assert_close(client.forward(pairs).chosen, b.forward(pairs).chosen)
    assert b.identity()["model"] == "builtin:tiny"
    client.close()
    assert client.engine.model is None  # the separate copy is freed; the policy is untouched
    assert b.forward(pairs).chosen.shape == (6,)


def test_lora_shared_reference_equals_base_model_logps(tokenizer: Any) -> None:
    from preftune.tiny import tiny_model

    b = backend(tokenizer, lora_rank=4, learning_rate=0.05)
    pairs = make_pairs(tokenizer)
    loss = DPOLoss(beta=0.5)
    reference = b.reference_client(shared=True)
    ref_before = reference.forward(pairs)
    for _ in range(3):  # train the adapter so the policy moves away from the base
        b.forward_backward(pairs, BoundLoss(loss, ref_before, 1.0))
        b.optim_step(AdamParams(0.05))
    policy = b.forward(pairs)
    assert not torch.allclose(policy.chosen, ref_before.chosen, atol=1e-3)
    base = tiny_model().eval()
    after = reference.forward(pairs)
    for i, pair in enumerate(pairs):
        assert float(after.chosen[i]) == pytest.approx(sums(base, pair, "chosen"), abs=1e-4)
    reference.close()  # the shared base belongs to the policy: closing frees nothing
    # the adapter is active again after the reference forward
    torch.testing.assert_close(b.forward(pairs).chosen, policy.chosen)


def test_accumulated_micro_batches_give_the_whole_batch_gradient(tokenizer: Any) -> None:
    pairs = make_pairs(tokenizer)
    loss = DPOLoss(beta=0.3)

    def gradient(groups: list[list[int]]) -> torch.Tensor:
        b = backend(tokenizer)
        ref = b.reference_client(shared=False)
        for group in groups:
            micro = [pairs[i] for i in group]
            b.forward_backward(micro, BoundLoss(loss, ref.forward(micro), len(group) / len(pairs)))
        return torch.cat([p.grad.flatten() for p in b.params if p.grad is not None])

    whole = gradient([[0, 1, 2, 3, 4, 5]])
    split = gradient([[0, 1, 2, 3], [4, 5]])
    assert whole.norm() > 0
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)


def test_optim_step_reports_grad_norm_and_clips(tokenizer: Any) -> None:
    b = backend(tokenizer)
    before = [p.detach().clone() for p in b.params]
    b.forward_backward(make_pairs(tokenizer), Fn(lambda policy: -policy.chosen.sum()))
    norm = resolve(b.optim_step(AdamParams(1e-3, max_grad_norm=1.0)))["grad_norm"]
    assert norm > 1.0 and math.isfinite(norm)
    assert any(not torch.equal(a, p) for a, p in zip(before, b.params))
    assert all(p.grad is None for p in b.params)


def test_non_finite_gradient_is_not_applied(tokenizer: Any) -> None:
    from preftune import TrainingError

    b = backend(tokenizer)
    before = [p.detach().clone() for p in b.params]
    pairs = make_pairs(tokenizer)
    out = b.forward_backward(pairs, Fn(lambda policy: policy.chosen.sum() * float("inf")))
    assert b.guards_nonfinite  # so the loop steps before its one host sync
    with pytest.raises(TrainingError, match="gradient norm is (nan|inf) at step 1; the step was not applied"):
        optimizer_step(b, [(out, 1.0)], AdamParams(1e-3), 1, pairs)
    assert all(torch.equal(a, p) for a, p in zip(before, b.params))


def test_saved_weights_load_with_transformers_and_peft(tokenizer: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.tiny import tiny_model

    full = backend(tokenizer)
    full.save_weights(str(tmp_path / "full"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(loaded.state_dict()["model.norm.weight"],
                               full.model.state_dict()["model.norm.weight"])
    lora = backend(tokenizer, lora_rank=4)
    lora.save_weights(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter") is not None
    # saving again replaces the directory whole
    lora.save_weights(str(tmp_path / "adapter"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "full"]


def test_state_round_trip_restores_weights_and_optimizer(tokenizer: Any, tmp_path: Path) -> None:
    b = backend(tokenizer)
    pairs = make_pairs(tokenizer)

    def step(backend: LocalBackend) -> None:
        backend.forward_backward(pairs, Fn(lambda policy: -policy.chosen.sum()))
        backend.optim_step(AdamParams(1e-3))

    step(b)
    b.save_state(str(tmp_path / "state.pt"))
    step(b)
    other = backend(tokenizer)
    other.load_state(str(tmp_path / "state.pt"))
    step(other)
    for a, c in zip(b.params, other.params):
        torch.testing.assert_close(a, c)


def test_tokenizer_larger_than_the_model_is_a_clear_error(tokenizer: Any) -> None:
    from preftune import ConfigError

    class Big:
        def __len__(self) -> int:
            return 10**6

    with pytest.raises(ConfigError, match="tokens but model 'builtin:tiny' only"):
        backend(Big())
