"""TRL's DPO loss variants: each equals TRL 1.16's own code, value and gradient, to 1e-6; options
are checked; three variants learn the preference end to end on the tiny model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from preftune import Config, ConfigError, PairLogps, run
from preftune.plugins.dpo_variants import VARIANTS

B, T = 6, 9  # pairs, longest completion

# preftune name -> how TRL 1.16 computes it: ("dpo", loss_type list, loss_weights, args) runs
# DPOTrainer._compute_loss; ("cpo", loss_type, args) runs CPOTrainer.cpo_loss
TRL_CASES: dict[str, tuple[Any, ...]] = {
    "hinge": ("dpo", ["hinge"], None, {}),
    "robust": ("dpo", ["robust"], None, {"label_smoothing": 0.2}),
    "cdpo": ("cpo", "sigmoid", {"label_smoothing": 0.2}),
    "simpo": ("cpo", "simpo", {"simpo_gamma": 0.7, "label_smoothing": 0.1}),
    "rpo": ("dpo", ["sigmoid", "sft"], [1.0, 0.6], {}),
    "bco_pair": ("dpo", ["bco_pair"], None, {}),
    "sppo_hard": ("dpo", ["sppo_hard"], None, {}),
    "nca_pair": ("dpo", ["nca_pair"], None, {}),
    "apo_zero": ("dpo", ["apo_zero"], None, {}),
    "apo_down": ("dpo", ["apo_down"], None, {}),
    "exo_pair": ("dpo", ["exo_pair"], None, {"label_smoothing": 0.01}),
    "discopop": ("dpo", ["discopop"], None, {"discopop_tau": 0.3}),
    "sft": ("dpo", ["sft"], None, {}),
}
# the same settings as preftune options tables
OPTIONS = {"robust": {"label_smoothing": 0.2}, "cdpo": {"label_smoothing": 0.2},
           "simpo": {"gamma": 0.7, "label_smoothing": 0.1}, "rpo": {"alpha": 0.6},
           "exo_pair": {"label_smoothing": 0.01}, "discopop": {"tau": 0.3}}


@pytest.fixture
def float64() -> Iterator[None]:
    """TRL builds constants with torch.tensor(float): in float64 they round as ours do."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def random_numbers(seed: int) -> dict[str, torch.Tensor]:
    """Per-sequence sums (policy: leaves with gradients), reference sums and token counts."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2, B), generator=gen).double()

    def sums() -> torch.Tensor:
        return -torch.rand(2, B, generator=gen, dtype=torch.float64) * lengths * 1.5

    policy, ref = sums(), ref_near(sums(), gen)
    return {"chosen": policy[0].clone().requires_grad_(), "rejected": policy[1].clone().requires_grad_(),
            "ref_chosen": ref[0], "ref_rejected": ref[1], "lengths": lengths}


def ref_near(policy: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Reference sums a few nats from the policy's, so the sigmoids are far from saturated."""
    return policy + torch.randn(policy.shape, generator=gen, dtype=torch.float64) * 3


def ours(name: str, beta: float, n: dict[str, torch.Tensor]) -> torch.Tensor:
    from preftune.plugins.dpo_variants import VariantLoss

    variant = VARIANTS[name]
    options = variant.options(**OPTIONS.get(name, {})) if variant.options else None
    policy = PairLogps(n["chosen"], n["rejected"], n["lengths"][0], n["lengths"][1])
    reference = PairLogps(n["ref_chosen"], n["ref_rejected"], n["lengths"][0], n["lengths"][1])
    loss, _ = VariantLoss(variant, beta, options)(policy, reference if variant.needs_reference else None)
    return loss


def per_token(sums_2B: torch.Tensor, lengths_2B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [2B, T] whose masked rows sum to ``sums_2B`` (each token the mean),
    and the completion mask, as TRL's model output and collator give them."""
    mask = (torch.arange(T).unsqueeze(0) < lengths_2B.unsqueeze(1)).double()
    return (sums_2B / lengths_2B).unsqueeze(1) * mask, mask


def trl_dpo(loss_types: list[str], weights: list[float] | None, args: dict[str, Any], beta: float,
            n: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL 1.16's DPOTrainer._compute_loss on a minimal trainer whose 'model' returns log-probs
    made from our per-sequence numbers (reference log-probs precomputed, as TRL allows)."""
    from trl import DPOTrainer

    lengths_2B = torch.cat([n["lengths"][0], n["lengths"][1]])
    logps_2BT, mask_2BT = per_token(torch.cat([n["chosen"], n["rejected"]]), lengths_2B)
    output = SimpleNamespace(log_probs=logps_2BT, entropy=torch.zeros(2 * B, T),
                             mean_logits=torch.zeros(2 * B, T),
                             is_top1=torch.zeros(2 * B, T, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=args.get("label_smoothing", 0.0), use_weighting=False,
        args=SimpleNamespace(discopop_tau=args.get("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    # one prompt token, then the completion
    completion_mask = torch.cat([torch.zeros(2 * B, 1), mask_2BT], dim=1).long()
    ones = torch.ones_like(completion_mask)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion_mask,
              "ref_chosen_logps": n["ref_chosen"], "ref_rejected_logps": n["ref_rejected"]}
    return DPOTrainer._compute_loss(trainer, lambda **kw: output, inputs, False)


def trl_cpo(loss_type: str, args: dict[str, Any], beta: float, n: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL 1.16's CPOTrainer.cpo_loss: SimPO on per-token means (as its ``average_log_prob``
    gives them) and cDPO on the DPO log ratios (cpo_loss is DPO's sigmoid on its inputs)."""
    from trl.experimental.cpo import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type,
                              accelerator=SimpleNamespace(device="cpu"),
                              label_smoothing=args.get("label_smoothing", 0.0),
                              simpo_gamma=args.get("simpo_gamma", 0.5))
    if loss_type == "simpo":
        chosen, rejected = n["chosen"] / n["lengths"][0], n["rejected"] / n["lengths"][1]
    else:
        chosen, rejected = n["chosen"] - n["ref_chosen"], n["rejected"] - n["ref_rejected"]
    losses, _, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.mean()


def trl_loss(name: str, beta: float, n: dict[str, torch.Tensor]) -> torch.Tensor:
    kind, *case = TRL_CASES[name]
    return trl_dpo(*case, beta, n) if kind == "dpo" else trl_cpo(*case, beta, n)


def grads(loss: torch.Tensor, n: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """d loss / d chosen and d rejected (zeros for a loss that does not use one: sft)."""
    return torch.autograd.grad(loss, [n["chosen"], n["rejected"]], allow_unused=True,
                               materialize_grads=True)


def test_every_variant_is_compared_with_trl() -> None:
    assert set(TRL_CASES) == set(VARIANTS)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("name", sorted(TRL_CASES))
def test_loss_and_gradient_equal_trl(name: str, beta: float, float64: None) -> None:
    pytest.importorskip("trl")
    n = random_numbers(seed=sorted(TRL_CASES).index(name) + int(beta * 100))
    expected, got = trl_loss(name, beta, n), ours(name, beta, n)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for side, g, e in zip(("chosen", "rejected"), grads(got, n), grads(expected, n)):
        if (name, side) != ("sft", "rejected"):  # sft is the chosen NLL alone
            assert e.abs().max() > 0  # the comparison is of a gradient that is there
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_every_variant_reports_dpos_metrics(registry: Any) -> None:
    n = random_numbers(seed=3)
    policy = PairLogps(n["chosen"], n["rejected"], n["lengths"][0], n["lengths"][1])
    reference = PairLogps(n["ref_chosen"], n["ref_rejected"], n["lengths"][0], n["lengths"][1])
    dpo_keys = set(registry.build("loss", "dpo", Config(base_model="m", dataset="d"))(policy, reference)[1])
    for name in VARIANTS:
        loss = registry.build("loss", name, Config(base_model="m", dataset="d", loss=name, beta=0.3))
        _, metrics = loss(policy, reference if loss.needs_reference else None)
        assert set(metrics) == dpo_keys, name
        assert not any(m.requires_grad for m in metrics.values())
        if loss.needs_reference:  # rewards are beta times the log ratios, as DPO's
            ratio_B = (n["chosen"] - n["ref_chosen"]).detach()
            torch.testing.assert_close(metrics["chosen_reward"], 0.3 * ratio_B.mean())


def test_simpo_needs_no_reference_and_uses_simpos_beta_unless_beta_is_set(registry: Any) -> None:
    simpo = registry.build("loss", "simpo", Config(base_model="m", dataset="d", loss="simpo"))
    assert simpo.needs_reference is False and simpo.beta == 2.0 and simpo.options.gamma == 0.5
    chosen = Config(base_model="m", dataset="d", loss="simpo", beta=0.1, simpo={"gamma": 0.0})
    assert registry.build("loss", "simpo", chosen).beta == 0.1  # the user's beta, even the default value
    others = [name for name in VARIANTS if name not in ("simpo", "sft")]
    assert all(registry.build("loss", name, Config(base_model="m", dataset="d")).needs_reference
               for name in others)
    assert registry.build("loss", "hinge", Config(base_model="m", dataset="d")).beta == 0.1


@pytest.mark.parametrize(("table", "value", "key"), [
    ("robust", {"label_smoothing": 0.5}, "robust.label_smoothing"),
    ("cdpo", {"label_smoothing": -0.1}, "cdpo.label_smoothing"),
    ("exo_pair", {"label_smoothing": 0.0}, "exo_pair.label_smoothing"),
    ("discopop", {"tau": 0.0}, "discopop.tau"),
    ("rpo", {"alpha": -1.0}, "rpo.alpha"),
    ("simpo", {"gama": 1.0}, "simpo.gama"),
    ("hinge", {"label_smoothing": 0.1}, "hinge"),  # a variant without options has no table
])
def test_bad_options_name_their_key(registry: Any, table: str, value: dict[str, Any], key: str) -> None:
    config = Config(base_model="m", dataset="d", loss=table, **{table: value})
    with pytest.raises(ConfigError, match=key):
        config.check_plugin_tables(registry)


def test_variants_learn_the_preference_end_to_end(make_config: Any, tmp_path: Any) -> None:
    """Three variants of different shapes (a margin hinge, per-sequence rewards, reference-free
    means) each raise held-out accuracy on the tiny model's demo preference."""
    runs = {"hinge": {"beta": 0.5}, "bco_pair": {"beta": 0.5}, "simpo": {"simpo": {"gamma": 0.5}}}
    for name, settings in runs.items():
        config = make_config(loss=name, epochs=3, learning_rate=3e-3, log_path=str(tmp_path / name),
                             **settings)
        summary = run(config)
        first, last = summary["initial_eval"], summary["final_eval"]
        assert last["eval_accuracy"] > first["eval_accuracy"], (name, first, last)
        assert last["eval_accuracy"] >= 0.8 and last["eval_loss"] < first["eval_loss"], (name, last)


def test_sft_is_the_chosen_nll_per_token_and_needs_no_reference(registry: Any) -> None:
    n = random_numbers(seed=5)
    policy, _ = pair_logps(n)
    config = Config(base_model="m", dataset="d", loss="sft")
    sft = registry.build("loss", "sft", config)
    assert sft.needs_reference is False and not getattr(sft, "needs_token_logps", False)
    assert sft.options is None  # TRL's "sft" has no settings: no [sft] table
    value, metrics = sft(policy, None)
    expected = -n["chosen"].sum() / n["lengths"][0].sum()
    torch.testing.assert_close(value, expected.to(value.dtype))
    means = n["chosen"] / n["lengths"][0] - n["rejected"] / n["lengths"][1]
    torch.testing.assert_close(metrics["margin"], means.mean().detach())  # per-token means, as simpo's


def test_sft_lowers_the_chosen_nll_on_the_demo(make_config: Any, tmp_path: Any) -> None:
    """loss = "sft" on the bundled demo data: the held-out chosen NLL (its eval_loss) falls,
    and no reference model is loaded."""
    from pathlib import Path

    from preftune.tiny import demo_data

    config = make_config(loss="sft", dataset=str(demo_data("train")), eval_dataset=str(demo_data("heldout")),
                         batch_size=16, epochs=1, learning_rate=2e-3,
                         max_seq_len=128, log_path=str(tmp_path / "sft"))
    summary = run(config)
    first, last = summary["initial_eval"], summary["final_eval"]
    assert not (Path(config.cache_dir) / "reference").exists()
    assert last["eval_loss"] < first["eval_loss"] - 0.5, (first, last)
    assert last["eval_logps_chosen"] > first["eval_logps_chosen"]


# ---- combined: a weighted sum of registered losses (TRL's loss_type list with loss_weights) -----

# (preftune [combined] table, other tables) -> TRL 1.16's loss_type list and loss_weights.
# MPO (TRL's ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]) is rpo (dpo + 1.25 * sft) at 0.8.
COMBINED_CASES = [
    ({"losses": ["dpo", "bco_pair"], "weights": [0.8, 0.2]}, {},
     ["sigmoid", "bco_pair"], [0.8, 0.2]),
    ({"losses": ["rpo", "bco_pair"], "weights": [0.8, 0.2]}, {"rpo": {"alpha": 1.25}},
     ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
    ({"losses": ["hinge", "apo_zero"]}, {}, ["hinge", "apo_zero"], [1.0, 1.0]),
    ({"losses": ["dpo", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]}, {},
     ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO as TRL writes it
]


def pair_logps(n: dict[str, torch.Tensor]) -> tuple[PairLogps, PairLogps]:
    lengths = n["lengths"]
    return (PairLogps(n["chosen"], n["rejected"], lengths[0], lengths[1]),
            PairLogps(n["ref_chosen"], n["ref_rejected"], lengths[0], lengths[1]))


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(("table", "tables", "trl_types", "trl_weights"), COMBINED_CASES)
def test_combined_equals_trls_weighted_loss_types(registry: Any, float64: None, beta: float,
                                                  table: dict[str, Any], tables: dict[str, Any],
                                                  trl_types: list[str], trl_weights: list[float]) -> None:
    pytest.importorskip("trl")
    n = random_numbers(seed=len(trl_types) + int(beta * 100))
    config = Config(base_model="m", dataset="d", loss="combined", beta=beta, combined=table, **tables)
    loss = registry.build("loss", "combined", config)
    got, metrics = loss(*pair_logps(n))
    expected = trl_dpo(trl_types, trl_weights, {}, beta, n)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads(got, n), grads(expected, n)):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    weights = table.get("weights", [1.0] * len(table["losses"]))
    parts = sum(w * metrics[f"loss_{name}"] for name, w in zip(table["losses"], weights))
    torch.testing.assert_close(parts, got.detach(), rtol=1e-6, atol=1e-6)


def test_combined_reports_the_first_parts_metrics_and_each_parts_loss(registry: Any) -> None:
    n = random_numbers(seed=11)
    policy, reference = pair_logps(n)
    config = Config(base_model="m", dataset="d", loss="combined", beta=0.2,
                    combined={"losses": ["orpo", "dpo"], "weights": [1.0, 0.5]})
    loss = registry.build("loss", "combined", config)
    assert loss.needs_reference and not loss.needs_token_logps
    _, metrics = loss(policy, reference)
    orpo_value, orpo_metrics = registry.build("loss", "orpo", config)(policy, None)
    dpo_value, _ = registry.build("loss", "dpo", config)(policy, reference)
    assert set(metrics) == set(orpo_metrics) | {"loss_orpo", "loss_dpo"}
    torch.testing.assert_close(metrics["nll"], orpo_metrics["nll"])
    torch.testing.assert_close(metrics["loss_orpo"], orpo_value.detach())
    torch.testing.assert_close(metrics["loss_dpo"], dpo_value.detach())
    assert not any(m.requires_grad for m in metrics.values())
    free = Config(base_model="m", dataset="d", combined={"losses": ["simpo", "orpo"]})
    assert registry.build("loss", "combined", free).needs_reference is False


class TokenLoss:
    """A loss asking for per-token log-probs: the mean chosen token log-prob, negated."""

    needs_reference = False
    needs_token_logps = True

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> tuple[torch.Tensor, dict]:
        assert policy.tokens is not None
        return -policy.tokens.chosen_BT.mean(), {}


def test_combined_asks_for_token_logps_when_a_part_does() -> None:
    from preftune import get_plugin_manager, get_registry, hookimpl

    class Plugin:
        @hookimpl
        def register_losses(self, register: Any) -> None:
            register("token_mean", lambda config, options: TokenLoss())

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="token_mean")
    config = Config(base_model="m", dataset="d", combined={"losses": ["dpo", "token_mean"]})
    loss = get_registry(pm).build("loss", "combined", config)
    assert loss.needs_token_logps and loss.needs_reference


@pytest.mark.parametrize(("table", "key", "words"), [
    ({}, "combined.losses", "at least one"),
    ({"losses": ["dpo", "combined"]}, "combined.losses", "cannot contain itself"),
    ({"losses": ["dpo", "bco_pairs"]}, "combined.losses", "unknown loss 'bco_pairs'"),
    ({"losses": ["dpo", "dpo"]}, "combined.losses", "listed twice"),
    ({"losses": ["dpo", "bco_pair"], "weights": [1.0]}, "combined.weights", "1 weights for the 2"),
    ({"losses": ["dpo"], "weights": [-1.0]}, "combined.weights", ">= 0"),
    ({"losses": ["dpo"], "weight": [1.0]}, "combined.weight", "unknown key"),
])
def test_bad_combined_settings_name_their_key(registry: Any, table: dict[str, Any], key: str,
                                              words: str) -> None:
    config = Config(base_model="m", dataset="d", loss="combined", combined=table)
    with pytest.raises(ConfigError, match=key) as error:
        registry.build("loss", "combined", config)
    assert words in str(error.value)


def test_a_parts_table_is_read_not_called_ignored(registry: Any) -> None:
    from preftune.advice import ignored_settings

    config = Config(base_model="m", dataset="d", loss="combined", rpo={"alpha": 0.5},
                    simpo={"gamma": 1.0}, combined={"losses": ["rpo", "bco_pair"]})
    loss = registry.build("loss", "combined", config)
    assert loss.parts["rpo"].options.alpha == 0.5
    notes = ignored_settings(config, loss)
    assert not any("[rpo]" in note for note in notes) and any("[simpo]" in note for note in notes)
    with pytest.raises(ConfigError, match="rpo.alpha"):
        bad = Config(base_model="m", dataset="d", loss="combined", rpo={"alpha": -1.0},
                     combined={"losses": ["rpo"]})
        registry.build("loss", "combined", bad)


def test_combined_trains_end_to_end_and_reports_each_part(make_config: Any, tmp_path: Any) -> None:
    """dpo and bco_pair at 0.8 / 0.2 on the tiny model: the reference is loaded (both need one),
    the held-out loss is the weighted sum of the parts' held-out losses, and accuracy rises."""
    from pathlib import Path

    config = make_config(loss="combined", epochs=3, learning_rate=3e-3, beta=0.5,
                         log_path=str(tmp_path / "c"),
                         combined={"losses": ["dpo", "bco_pair"], "weights": [0.8, 0.2]})
    summary = run(config)
    assert (Path(config.cache_dir) / "reference").exists()
    first, last = summary["initial_eval"], summary["final_eval"]
    for evals in (first, last):
        parts = 0.8 * evals["eval_loss_dpo"] + 0.2 * evals["eval_loss_bco_pair"]
        assert abs(evals["eval_loss"] - parts) < 1e-5, evals
    assert last["eval_accuracy"] > first["eval_accuracy"] and last["eval_loss"] < first["eval_loss"]
