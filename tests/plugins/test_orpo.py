"""The ORPO loss: formula, numerical stability, options, and a reference-free run."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from preftune import ConfigError, PairLogps, run
from preftune.plugins.orpo import ORPOLoss, ORPOOptions, log1mexp, nll_per_token


def per_token(lengths: list[tuple[int, int]], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return ([-torch.rand(c, generator=gen) * 2 for c, _ in lengths],
            [-torch.rand(r, generator=gen) * 2 for _, r in lengths])


def numbers(chosen: list[torch.Tensor], rejected: list[torch.Tensor]) -> PairLogps:
    """Sums and counts of per-token log-probs, as a backend reports them."""
    return PairLogps(torch.stack([t.sum() for t in chosen]), torch.stack([t.sum() for t in rejected]),
                     torch.tensor([float(len(t)) for t in chosen]),
                     torch.tensor([float(len(t)) for t in rejected]))


def test_orpo_matches_the_paper_and_trl_pair_by_pair() -> None:
    chosen, rejected = per_token([(2, 4), (5, 1)], seed=1)
    loss, metrics = ORPOLoss(0.3)(numbers(chosen, rejected), None)
    expected, nlls = [], []
    for i in range(2):
        lc = chosen[i].mean().item()  # mean per-token log-prob
        lr = rejected[i].mean().item()
        log_odds = (lc - math.log(1 - math.exp(lc))) - (lr - math.log(1 - math.exp(lr)))
        or_loss = -math.log(1 / (1 + math.exp(-log_odds)))
        nlls.append(-lc)
        expected.append(-lc + 0.3 * or_loss)
    assert math.isclose(float(loss), sum(expected) / 2, rel_tol=1e-5)  # mean, not sum
    assert math.isclose(float(metrics["nll"]), sum(nlls) / 2, rel_tol=1e-5)


def trl_orpo(chosen: torch.Tensor, rejected: torch.Tensor, lengths: torch.Tensor,
             lam: float) -> tuple[torch.Tensor, float]:
    """TRL 1.16's ``ORPOTrainer.get_batch_loss_metrics`` (its loss and ``nll_loss``) on a stand-in
    trainer whose 'model' returns logits made from our per-sequence sums: a two-token vocabulary
    whose label token gets each completion's mean log-prob at every completion position. The
    prompt is one token, which TRL's shifted cross-entropy never predicts: its NLL then covers
    the completions only, the tokens a preftune loss sees (a longer prompt adds its tokens)."""
    from trl.experimental.orpo import ORPOTrainer

    b, t = lengths.shape[1], int(lengths.max())
    lp_2BT = (torch.cat([chosen, rejected]) / lengths.reshape(-1)).unsqueeze(1).expand(-1, t)
    # logits (lp, log(1 - e^lp)): log_softmax gives the label exactly lp, and its gradient
    position_2BT2 = torch.stack([lp_2BT, torch.log(-torch.expm1(lp_2BT))], dim=-1)
    logits = torch.cat([position_2BT2, torch.zeros(2 * b, 1, 2)], dim=1)  # the last predicts nothing

    def rows(lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        completion = (torch.arange(t).unsqueeze(0) < lengths_B.unsqueeze(1)).long()
        attention = torch.cat([torch.ones(b, 1, dtype=torch.long), completion], dim=1)
        labels = torch.where(attention.bool(), 0, -100)
        labels[:, 0] = -100  # the prompt token
        return torch.zeros_like(attention), attention, labels

    batch = {}
    for side, lengths_B in (("chosen", lengths[0]), ("rejected", lengths[1])):
        ids, mask, labels = rows(lengths_B)
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    trainer = object.__new__(ORPOTrainer)  # no __init__: only the attributes the loss reads
    trainer.__dict__.update(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=lam,
                            accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer, model, batch)
    return loss, metrics["nll_loss"]


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_token_nll_equals_trls_orpo_loss_and_gradient(lam: float) -> None:
    pytest.importorskip("trl")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TRL's odds ratio is float32: ours must not lose more
    try:
        gen = torch.Generator().manual_seed(int(lam * 10))
        lengths = torch.randint(1, 9, (2, 6), generator=gen).double()
        sums = -torch.rand(2, 6, generator=gen, dtype=torch.float64) * lengths * 1.5
        chosen, rejected = sums[0].clone().requires_grad_(), sums[1].clone().requires_grad_()
        expected, trl_nll = trl_orpo(chosen, rejected, lengths, lam)
        got, metrics = ORPOLoss(lam, "token")(PairLogps(chosen, rejected, lengths[0], lengths[1]), None)
        pair, _ = ORPOLoss(lam)(PairLogps(chosen, rejected, lengths[0], lengths[1]), None)
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert math.isclose(float(metrics["nll"]), trl_nll, rel_tol=1e-6)
    assert abs(pair.item() - expected.item()) > 1e-3  # the default averages per pair: not TRL's
    for g, e in zip(torch.autograd.grad(got, [chosen, rejected]),
                    torch.autograd.grad(expected, [chosen, rejected])):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_token_nll_weighs_each_token_once() -> None:
    """Two pairs whose chosen completions are 1 and 3 tokens: per token, the long one counts 3x."""
    chosen, rejected = [torch.tensor([-3.0]), torch.full((3,), -1.0)], [torch.tensor([-2.0])] * 2
    _, token = ORPOLoss(0.1, "token")(numbers(chosen, rejected), None)
    _, pair = ORPOLoss(0.1, "pair")(numbers(chosen, rejected), None)
    assert math.isclose(float(token["nll"]), 6.0 / 4, rel_tol=1e-6)
    assert math.isclose(float(pair["nll"]), (3.0 + 1.0) / 2, rel_tol=1e-6)


def test_log1mexp_is_stable_where_naive_forms_fail() -> None:
    x = torch.tensor([-1e-9, -1e-6, -0.5, -1.0, -30.0, -100.0], dtype=torch.float32)
    out = log1mexp(x)
    assert torch.isfinite(out).all()
    expected = torch.log(-torch.expm1(x.double())).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0.0, -1e-9])
def test_loss_and_gradient_stay_finite_at_logp_zero(value: float) -> None:
    chosen = torch.full((3,), value, requires_grad=True)  # chosen at log-prob ~0, rejected at -2
    policy = numbers([chosen], [torch.full((3,), -2.0)])
    loss, metrics = ORPOLoss(0.1)(policy, None)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(chosen.grad).all()
    assert float(metrics["accuracy"]) == 1.0


def test_orpo_options_use_the_lambda_key(registry: Any) -> None:
    from preftune import Config

    config = Config(base_model="builtin:tiny", dataset="d", loss="orpo", orpo={"lambda": 0.5})
    assert config.check_plugin_tables(registry)["orpo"].lambda_ == 0.5
    assert ORPOOptions().lambda_ == 0.1 and ORPOOptions().nll == "pair"
    with pytest.raises(ConfigError, match="orpo.lambda"):
        Config(base_model="builtin:tiny", dataset="d", orpo={"lambda": -1}).check_plugin_tables(
            registry)
    with pytest.raises(ConfigError, match="orpo.nll"):
        Config(base_model="builtin:tiny", dataset="d", orpo={"nll": "tokens"}).check_plugin_tables(
            registry)
    token = Config(base_model="builtin:tiny", dataset="d", loss="orpo", orpo={"nll": "token"})
    assert registry.build("loss", "orpo", token).nll is nll_per_token


def test_orpo_run_loads_one_model_and_does_no_reference_forward(
    make_config: Any, monkeypatch: Any
) -> None:
    import preftune.weights
    from preftune import refcache
    from preftune.plugins import local

    loads = []
    real_load = preftune.weights.load_causal_lm
    monkeypatch.setattr(local, "load_causal_lm", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(refcache, "compute", lambda *a, **k: pytest.fail("reference forward"))
    config = make_config(loss="orpo", epochs=4, learning_rate=3e-3, orpo={"lambda": 1.0})
    summary = run(config)
    assert len(loads) == 1
    assert not (Path(config.cache_dir) / "reference").exists()
    first, last = summary["initial_eval"], summary["final_eval"]
    assert {"eval_loss", "eval_nll", "eval_or_loss", "eval_log_odds_ratio",
            "eval_accuracy"} <= set(last)
    assert last["eval_loss"] < first["eval_loss"] and last["eval_nll"] < first["eval_nll"]
