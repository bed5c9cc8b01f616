"""The local backend's shortcuts change no number: the prompt computed once per pair, packing,
the output layer applied in chunks on completion positions only. Checked against the plain
computation (each sequence alone, the model's own logits) on real models built from configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from preftune import Config, Message, PairLogps, PreferencePair, tokenize_pair
from preftune.layout import padded_layout, shared_layout
from preftune.loop import BoundLoss
from preftune.plugins.dpo import DPOLoss
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.plugins.local_engine import Engine, calibrate, shared_unsupported
from preftune.plugins.orpo import ORPOLoss

PROMPTS = ["Is {} even?", "Tell me a long story about the number {} and its friends, please.",
           "Hi {}", "Translate {} into French, then into German, then back again."]


def make_pairs(tokenizer: Any, n: int = 7) -> list[Any]:
    """Pairs of mixed prompt and completion lengths (so layouts pack and pad differently)."""
    out = []
    for i in range(n):
        pair = PreferencePair(
            (Message("system", "Be brief."),) * (i % 2)
            + (Message("user", PROMPTS[i % len(PROMPTS)].format(i)),),
            (Message("assistant", "yes" if i % 3 else "Sure: " + "la " * i),),
            (Message("assistant", "maybe " * (i + 1)),))
        out.append(tokenize_pair(tokenizer, pair, 256))
    return out


def llama(tokenizer: Any, attn: str = "sdpa") -> Any:
    """A Llama-shaped model (untied embeddings, GQA) built from a config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         attn_implementation=attn)
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


def tiny(tokenizer: Any, attn: str = "sdpa") -> Any:
    from preftune.tiny import tiny_model

    model = tiny_model()
    model.config._attn_implementation = attn
    return model.eval()


MODELS = {"qwen3-tiny": tiny, "llama": llama}


def unshared_sums(model: Any, pairs: list[Any]) -> torch.Tensor:
    """``[2, B]`` summed completion log-probs, each sequence alone, from the model's own logits."""
    out = torch.zeros(2, len(pairs))
    device = next(model.parameters()).device
    for i, pair in enumerate(pairs):
        for s, side in enumerate(("chosen", "rejected")):
            tokens, weights = pair.sequence(side)
            logits = model(torch.tensor([tokens[:-1]], device=device)).logits[0].float().cpu()
            logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
            out = out.index_put((torch.tensor([s]), torch.tensor([i])),
                                (logps * torch.tensor(weights)).sum()[None])
    return out


def grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def engine_for(model: Any, layout: str, chunk: int = 4096) -> Engine:
    device = next(model.parameters()).device
    plan = calibrate(model, device, layout, chunk, max_seq_len=256)
    assert plan.layout == layout and plan.split_head and not plan.notes
    return Engine(model, device, 0, plan)


# a loss that weighs every sequence differently, so a gradient sent to the wrong sequence shows
COEF = torch.tensor([[0.7, -1.3, 0.4, 2.0, -0.5, 1.1, -0.9], [-1.2, 0.3, 1.6, -0.8, 0.6, -2.1, 0.2]])


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_CUDA = [pytest.param("flex_attention", "cuda", marks=CUDA_ONLY),  # no FlexAttention backward on CPU
           pytest.param("sdpa", "cuda", marks=CUDA_ONLY)]


@pytest.mark.parametrize("attn, device", [("sdpa", "cpu"), ("eager", "cpu"), *ON_CUDA])
@pytest.mark.parametrize("name", list(MODELS))
def test_shared_prompt_logps_and_gradients_equal_the_unshared_ones(tokenizer: Any, name: str,
                                                                   attn: str, device: str) -> None:
    model = MODELS[name](tokenizer, "sdpa").to(device)
    model.set_attn_implementation(attn)
    pairs = make_pairs(tokenizer)
    expected = unshared_sums(model, pairs)
    (COEF * expected).sum().backward()
    expected_grads = grads(model)
    for layout in ("shared", "padded"):
        out = engine_for(model, layout)(pairs)
        got = torch.stack([out.chosen, out.rejected]).cpu()
        torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
        (COEF * got).sum().backward()
        for key, grad in grads(model).items():
            torch.testing.assert_close(grad, expected_grads[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' flex integration with torch's FlexAttention and its block masks run
    uncompiled: torch 2.13's compiled CPU kernel fails to build once shapes turn dynamic (an
    inductor C++ error) and has no backward, and compiling costs ~10 s a shape. What is tested is
    the masks (our BlockMask, transformers' own) and transformers' flex path, not the kernel."""
    import transformers.integrations.flex_attention as integration
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def eager(query: Any, key: Any, value: Any, training: bool = False, **kwargs: Any) -> Any:
        return flex_attention(query, key, value, **kwargs)

    def uncompiled(*args: Any, _compile: bool = False, **kwargs: Any) -> Any:
        return create_block_mask(*args, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", eager)
    monkeypatch.setattr(masking, "create_block_mask", uncompiled)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", list(MODELS))
def test_flex_attention_logps_equal_the_unshared_ones(tokenizer: Any, name: str, eager_flex: None) -> None:
    model = MODELS[name](tokenizer, "sdpa")
    model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    pairs = make_pairs(tokenizer, 5)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        expected = unshared_sums(model, pairs)
        for layout in ("shared", "padded"):
            out = engine_for(model, layout)(pairs)
            torch.testing.assert_close(torch.stack([out.chosen, out.rejected]), expected, atol=1e-5,
                                       rtol=1e-5, msg=layout)


def test_shared_segments_are_packed_into_fewer_rows_than_padding(tokenizer: Any) -> None:
    pairs = make_pairs(tokenizer)
    shared, padded = shared_layout(pairs), padded_layout(pairs)
    segment_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) - 2 for p in pairs)
    assert shared.input_ids.shape[0] < len(pairs)  # some rows hold several pairs
    assert segment_tokens <= shared.num_inputs < padded.num_inputs
    torch.testing.assert_close(shared.counts, padded.counts)
    torch.testing.assert_close(shared.targets.sort().values, padded.targets.sort().values)


def sums_and_grads(model: Any, pairs: list[Any], chunk: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[2, B]`` sums through the shared layout, and the gradients of the COEF-weighted loss."""
    out = engine_for(model, "shared", chunk)(pairs)
    sums = torch.stack([out.chosen, out.rejected])
    (COEF * sums).sum().backward()
    return sums.detach(), grads(model)


def assert_same(a: tuple[torch.Tensor, dict[str, Any]], b: tuple[torch.Tensor, dict[str, Any]],
                atol: float) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=atol)
    for key, grad in b[1].items():
        torch.testing.assert_close(a[1][key], grad, atol=atol, rtol=10 * atol, msg=key)


def test_chunked_output_layer_equals_unchunked_values_and_gradients(tokenizer: Any) -> None:
    model = llama(tokenizer)
    pairs = make_pairs(tokenizer)
    whole = sums_and_grads(model, pairs, 10**6)  # one chunk
    assert_same(sums_and_grads(model, pairs, 7), whole, atol=1e-5)  # many checkpointed chunks


def test_activation_checkpointing_changes_no_gradient(tokenizer: Any) -> None:
    from preftune.plugins.local_engine import checkpoint_layers

    pairs = make_pairs(tokenizer)
    plain = sums_and_grads(llama(tokenizer), pairs, 7)
    model = llama(tokenizer)
    assert checkpoint_layers(model) == 2
    assert_same(sums_and_grads(model, pairs, 7), plain, atol=1e-6)


def test_token_rows_are_the_completion_tokens_in_order(tokenizer: Any) -> None:
    model = tiny(tokenizer)
    pairs = make_pairs(tokenizer)
    out = engine_for(model, "shared")(pairs, token_logps=True)
    for i, pair in enumerate(pairs):
        tokens, _ = pair.sequence("rejected")
        logits = model(torch.tensor([tokens[:-1]])).logits[0]
        alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
        n = len(pair.rejected)
        torch.testing.assert_close(out.tokens.rejected_BT[i, :n], alone[-n:], atol=1e-5, rtol=1e-5)
        assert torch.all(out.tokens.rejected_BT[i, n:] == 0)
    torch.testing.assert_close(out.tokens.chosen_BT.sum(-1), out.chosen, atol=1e-4, rtol=1e-5)


class Scaled(torch.nn.Module):
    """A causal LM whose logits are not its output layer's (like soft-capping or logit scaling)."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
        out = self.inner(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 0.5
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_a_model_whose_logits_are_not_its_output_layer_gets_its_own_logits(tokenizer: Any) -> None:
    model = Scaled(tiny(tokenizer))
    plan = calibrate(model, torch.device("cpu"), "auto", 64, 256)
    assert not plan.split_head and "not its output layer" in plan.notes[0]
    pairs = make_pairs(tokenizer, 3)
    out = Engine(model, torch.device("cpu"), 0, plan)(pairs)
    torch.testing.assert_close(torch.stack([out.chosen, out.rejected]), unshared_sums(model, pairs),
                               atol=1e-5, rtol=1e-5)


class IgnoresMasks(torch.nn.Module):
    """A model whose attention ignores custom masks and position ids (as some kernels do)."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model
        self.config = model.config
        with torch.no_grad():  # sharper attention, so seeing the wrong tokens shows in the numbers
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                **kwargs: Any) -> Any:
        return self.inner(input_ids=input_ids, **kwargs)

    def get_decoder(self) -> Any:
        inner = self.inner.get_decoder()
        return lambda attention_mask=None, position_ids=None, **kw: inner(**kw)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_a_model_that_ignores_custom_masks_falls_back_to_padded(tokenizer: Any, capsys: Any) -> None:
    model = IgnoresMasks(tiny(tokenizer))
    plan = calibrate(model, torch.device("cpu"), "auto", 64, 256)
    assert plan.layout == "padded" and "computed twice" in plan.notes[-1]
    with pytest.raises(Exception, match="layout = 'shared' is not possible"):
        backend_with(tokenizer, model, layout="shared")
    capsys.readouterr()
    backend = backend_with(tokenizer, model, layout="auto")
    assert backend.plan.layout == "padded"
    assert capsys.readouterr().err.count("computed twice per pair") == 1  # said once


def backend_with(tokenizer: Any, model: Any, layout: str) -> LocalBackend:
    import preftune.plugins.local as local

    config = Config(base_model="builtin:tiny", dataset="unused", device="cpu")
    real = local.load_causal_lm
    local.load_causal_lm = lambda *a, **k: model
    try:
        return LocalBackend(config, LocalOptions(layout=layout), tokenizer)
    finally:
        local.load_causal_lm = real


def test_a_sliding_window_shorter_than_max_seq_len_uses_padded(tokenizer: Any) -> None:
    model = tiny(tokenizer)
    assert shared_unsupported(model, 256) is None
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 64
    assert "sliding-window attention (64)" in shared_unsupported(model, 256)
    assert shared_unsupported(model, 64) is None


# The implementation before losses moved to per-sequence numbers (git 666d7d6): per-token [2B, T]
# log-probs of right-padded rows, the model's own logits cast to float32, weighted sums in the loss.
def previous_logps(model: Any, pairs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [p.sequence("chosen") for p in pairs] + [p.sequence("rejected") for p in pairs]
    width = max(len(t) - 1 for t, _ in rows)
    ids, tgt, w, mask = (torch.zeros((len(rows), width), dtype=d)
                         for d in (torch.long, torch.long, torch.float32, torch.long))
    for i, (tokens, weights) in enumerate(rows):
        n = len(tokens) - 1
        ids[i, :n], tgt[i, :n] = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
        w[i, :n], mask[i, :n] = torch.tensor(weights), 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = -F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none") * mask
    return logps, w


def previous_dpo(logps: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, beta: float) -> Any:
    b = logps.shape[0] // 2
    pi_c, pi_r = (logps[:b] * w[:b]).sum(-1), (logps[b:] * w[b:]).sum(-1)
    ref_c, ref_r = (ref[:b] * w[:b]).sum(-1), (ref[b:] * w[b:]).sum(-1)
    margin = (pi_c - ref_c) - (pi_r - ref_r)
    return -F.logsigmoid(beta * margin).mean(), {"margin": margin.mean(),
                                                 "chosen_reward": beta * (pi_c - ref_c).mean()}


def previous_orpo(logps: torch.Tensor, w: torch.Tensor, lam: float) -> Any:
    b = logps.shape[0] // 2
    mean_c = (logps[:b] * w[:b]).sum(-1) / w[:b].sum(-1)
    mean_r = (logps[b:] * w[b:]).sum(-1) / w[b:].sum(-1)
    odds = (mean_c - torch.log(-torch.expm1(mean_c))) - (mean_r - torch.log(-torch.expm1(mean_r)))
    return (-mean_c + lam * -F.logsigmoid(odds)).mean(), {"nll": (-mean_c).mean()}


@pytest.mark.parametrize("loss_name", ["dpo", "orpo"])
def test_losses_metrics_and_gradients_equal_the_previous_implementation(tokenizer: Any,
                                                                        loss_name: str) -> None:
    pairs = make_pairs(tokenizer)
    config = Config(base_model="builtin:tiny", dataset="unused", device="cpu", learning_rate=1e-2)
    backend = LocalBackend(config, LocalOptions(), tokenizer)
    assert backend.plan.layout == "shared"
    with torch.no_grad():
        ref_rows, _ = previous_logps(backend.model, pairs)
    ref_rows = ref_rows + 0.05 * torch.randn(ref_rows.shape, generator=torch.Generator().manual_seed(0))
    logps, w = previous_logps(backend.model, pairs)
    if loss_name == "dpo":
        expected_loss, expected = previous_dpo(logps, ref_rows, w, 0.3)
    else:
        expected_loss, expected = previous_orpo(logps, w, 0.7)
    expected_loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in backend.model.named_parameters()}
    backend.model.zero_grad(set_to_none=True)

    b = len(pairs)
    ref = PairLogps((ref_rows[:b] * w[:b]).sum(-1), (ref_rows[b:] * w[b:]).sum(-1),
                    w[:b].sum(-1), w[b:].sum(-1))
    loss = DPOLoss(0.3) if loss_name == "dpo" else ORPOLoss(0.7)
    metrics = backend.forward_backward(pairs, BoundLoss(loss, ref if loss_name == "dpo" else None, 1.0))
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), abs=1e-6)
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(float(value), abs=1e-5 * max(1, abs(float(value))))
    for name, param in backend.model.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
