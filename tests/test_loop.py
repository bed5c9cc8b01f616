"""End-to-end runs of the loop on the real tiny model and tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import preftune
from preftune import TrainingError, get_plugin_manager, get_registry, hookimpl, refcache, run
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.tiny import tiny_tokenizer


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_step0_dpo_loss_is_ln2_when_policy_equals_reference(make_config: Any) -> None:
    config = make_config(learning_rate=1e-9, epochs=1)
    summary = run(config)
    logs = Path(config.log_path)
    first = read_rows(logs / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["margin"] == pytest.approx(0.0, abs=1e-4)
    # evaluation at step 0 uses the reference pass's batches: policy == reference exactly
    initial = read_rows(logs / "eval.jsonl")[0]
    assert initial["step"] == 0
    assert initial["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert initial["eval_accuracy"] == 0.0
    assert summary["status"] == "completed"


def test_metrics_eval_config_and_weights_are_written(make_config: Any) -> None:
    config = make_config(epochs=2, eval_interval=3)
    summary = run(config)
    logs = Path(config.log_path)
    rows = read_rows(logs / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == summary["steps"] == 2 * math.ceil(18 / 4)
    expected = {"step", "epoch", "loss", "margin", "accuracy", "chosen_reward", "rejected_reward",
                "logps_chosen", "logps_rejected", "grad_norm", "lr", "tokens", "tokens_per_s",
                "elapsed_s", "peak_mem_mb"}
    assert expected <= set(rows[0])
    assert 0 < rows[0]["peak_mem_mb"] <= rows[-1]["peak_mem_mb"] <= summary["peak_mem_mb"]
    assert summary["precision"] == "fp32"  # the local backend's summary: auto on a CPU
    assert {r["epoch"] for r in rows} == {0, 1}
    evals = read_rows(logs / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 3, 6, 9, 10]
    assert {"eval_loss", "eval_accuracy", "eval_margin"} <= set(evals[0])
    saved = json.loads((logs / "config.json").read_text())
    assert saved["base_model"] == "builtin:tiny" and saved["loss"] == "dpo"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(summary["weights"])
    assert AutoTokenizer.from_pretrained(summary["weights"]).chat_template
    assert (Path(summary["weights"]) / "model.safetensors").exists()
    assert model.config.model_type == "qwen3"


def test_training_raises_heldout_accuracy_and_margin(make_config: Any) -> None:
    summary = run(make_config(epochs=6, learning_rate=3e-3, beta=0.5))
    assert summary["final_eval"]["eval_margin"] > summary["initial_eval"]["eval_margin"] + 1
    assert summary["final_eval"]["eval_accuracy"] >= 0.8


def test_second_run_does_no_reference_forward(make_config: Any, monkeypatch: Any,
                                              capsys: Any) -> None:
    calls = {"client": 0, "compute": 0}
    real_client, real_compute = LocalBackend.reference_client, refcache.compute

    def counting_client(self: Any, shared: bool) -> Any:
        calls["client"] += 1
        return real_client(self, shared)

    def counting_compute(*args: Any, **kwargs: Any) -> Any:
        calls["compute"] += 1
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(LocalBackend, "reference_client", counting_client)
    monkeypatch.setattr(refcache, "compute", counting_compute)
    run(make_config())
    assert calls == {"client": 1, "compute": 1}
    run(make_config(log_path=str(Path(make_config().log_path) / "again")))
    assert calls == {"client": 1, "compute": 1}
    assert "reusing cache" in capsys.readouterr().err


def test_changed_key_rebuilds_the_cache_and_says_why(make_config: Any, capsys: Any) -> None:
    run(make_config())
    capsys.readouterr()
    run(make_config(max_seq_len=30))
    err = capsys.readouterr().err
    assert "stale" in err and "max_seq_len" in err and "data_sha256" in err


def test_cached_reference_equals_fresh_reference(make_config: Any) -> None:
    config = make_config()
    run(config)
    [cache_file] = list((Path(config.cache_dir) / "reference").glob("*.pt"))
    cached, parts = refcache.ReferenceLogps.load(cache_file)
    assert parts["model"] == "builtin:tiny" and len(parts["weights_sha256"]) == 64
    assert parts["format_version"] == refcache.FORMAT_VERSION and parts["per_token"] == "False"
    assert len(cached) == 24 and cached.rows is None  # sums and counts only: 16 bytes a pair
    assert all(cached.sums[s].dtype == torch.float32 for s in ("chosen", "rejected"))
    assert torch.all(cached.sums["chosen"] < 0) and torch.all(cached.counts["chosen"] >= 1)
    backend = LocalBackend(config, LocalOptions(), tiny_tokenizer())
    registry = get_registry()
    data = preftune.loop.prepare_data(config, registry, preftune.loop.make_format(registry, config),
                                      tiny_tokenizer())
    fresh = backend.forward(data.pairs)
    torch.testing.assert_close(cached.select(range(24)).chosen, fresh.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached.select(range(24)).rejected_tokens, fresh.rejected_tokens)


class NaNLoss:
    needs_reference = False

    def __call__(self, policy: Any, reference: Any) -> Any:
        return policy.chosen.sum() * float("nan"), {}


class NaNPlugin:
    @hookimpl
    def register_losses(self, register: Any) -> None:
        register("nan", lambda config, options: NaNLoss())


def test_nan_loss_stops_with_step_and_source_lines(make_config: Any) -> None:
    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(NaNPlugin(), name="nan-plugin")
    config = make_config(loss="nan")
    with pytest.raises(TrainingError,
                       match=r"loss is nan at step 1; the step was not applied; pairs: .*data\.jsonl:\d+"):
        run(config, pm)
    assert not (Path(config.log_path) / "final").exists()


def test_grad_accumulation_gives_the_same_training_as_one_big_batch(
    make_config: Any, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    common = {"eval_fraction": 0, "max_pairs": 22, "learning_rate": 1e-2, "epochs": 2}
    big = make_config(log_path=str(tmp_path / "big"), batch_size=8, grad_accum=1, **common)
    acc = make_config(log_path=str(tmp_path / "acc"), batch_size=4, grad_accum=2, **common)
    run(big), run(acc)
    rows_big = read_rows(tmp_path / "big" / "metrics.jsonl")
    rows_acc = read_rows(tmp_path / "acc" / "metrics.jsonl")
    assert len(rows_big) == len(rows_acc) == 6  # steps of 8, 8, 6 (= 4 + 2) pairs per epoch
    # the first step's gradient is the same up to float32 summation order; later steps differ by
    # that noise as Adam's first, sign-like steps amplify it (a wrong micro-batch weight is ~10%)
    assert rows_big[0]["grad_norm"] == pytest.approx(rows_acc[0]["grad_norm"], rel=1e-5)
    for a, b in zip(rows_big, rows_acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    w_big = load_file(str(tmp_path / "big" / "final" / "model.safetensors"))
    w_acc = load_file(str(tmp_path / "acc" / "final" / "model.safetensors"))
    for name, tensor in w_big.items():
        # a few of Adam's near-zero-gradient entries move by about lr apart: compare whole tensors
        assert float((tensor - w_acc[name]).norm() / tensor.norm().clamp(min=1e-12)) < 1e-3, name


def test_unknown_plugin_names_fail_before_loading_anything(make_config: Any) -> None:
    with pytest.raises(preftune.ConfigError, match="unknown loss 'dpoo'.*known losses: .*dpo, exo_pair"):
        run(make_config(loss="dpoo"))
    with pytest.raises(preftune.ConfigError, match="unknown sink 'wandbb'.*console, jsonl"):
        run(make_config(sinks=["jsonl", "wandbb"]))


def test_learning_rate_schedules_with_warmup(make_config: Any) -> None:
    from preftune.loop import learning_rate

    def lrs(**kw: Any) -> list[float]:
        config = make_config(learning_rate=1.0, **kw)
        return [learning_rate(config, step, 10) for step in range(10)]

    assert lrs() == [1.0] * 10
    assert lrs(warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lrs(lr_schedule="linear", warmup_steps=2)
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[3] == pytest.approx(1 - 1 / 8)
    assert all(a > b for a, b in zip(linear[2:], linear[3:]))
    cosine = lrs(lr_schedule="cosine")
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[9] > 0


def test_scheduled_lr_reaches_the_metrics(make_config: Any) -> None:
    config = make_config(lr_schedule="linear", warmup_steps=2, learning_rate=1e-3, epochs=2)
    run(config)
    lrs = [r["lr"] for r in read_rows(Path(config.log_path) / "metrics.jsonl")]
    assert lrs[:2] == [5e-4, 1e-3] and lrs[-1] < lrs[2]


def test_a_local_model_directory_works_as_base_and_tokenizer(make_config: Any, tmp_path: Path,
                                                             tokenizer: Any) -> None:
    """Any Hugging Face model directory: loaded by transformers, keyed by the identity of its files."""
    from preftune.backend_utils import files_identity
    from preftune.tiny import tiny_model

    model_dir = tmp_path / "my-model"
    tiny_model(seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = make_config(base_model=str(model_dir))
    summary = run(config)
    assert summary["status"] == "completed"
    [cache_file] = list((Path(config.cache_dir) / "reference").glob("*.pt"))
    _, parts = refcache.ReferenceLogps.load(cache_file)
    assert parts["model"] == str(model_dir.resolve())
    assert parts["files_sha256"] == files_identity(model_dir)


@pytest.mark.parametrize(("name", "options"), [
    ("sft", {}), ("rpo", {"rpo": {"alpha": 0.7}}), ("orpo", {"orpo": {"nll": "token"}}), ("dpo", {}),
    ("combined", {"combined": {"losses": ["dpo", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]}})])
@pytest.mark.parametrize("size", [2, 3])
def test_ranks_shares_of_a_micro_batch_add_up_to_one_process_loss_and_gradient(
        make_config: Any, name: str, options: dict[str, Any], size: int) -> None:
    """What each rank computes on its share of every micro-batch (weighted as train_step weights
    it, the per-token means divided by the share's part of the micro-batch's tokens), summed over
    the ranks and averaged as DDP averages gradients, is one process's loss and gradient, for
    per-token averages (sft, rpo, orpo's token NLL) as for per-pair ones."""
    from preftune.step import BoundLoss, share_tokens
    from preftune.types import PairLogps, TokenizedPair
    from preftune.world import World

    config = make_config(loss=name, **options)
    loss = get_registry().build("loss", name, config)
    gen = torch.Generator().manual_seed(size)
    lengths = torch.randint(1, 40, (7,), generator=gen).tolist()  # chosen completions of unequal lengths
    pairs = [TokenizedPair((1,), tuple(range(n)), (2, 3), (1.0,) * n, (1.0, 1.0)) for n in lengths]
    chunk, micro = list(range(7)), [0, 1, 2, 3, 4]  # a step of 7 pairs; this micro-batch is 5 of them
    chosen = (-torch.rand(7, generator=gen, dtype=torch.float64) * torch.tensor(lengths)).requires_grad_()
    rejected = (-torch.rand(7, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    ref_chosen = -torch.rand(7, dtype=torch.float64, generator=gen) * 30
    ref_rejected = -torch.rand(7, dtype=torch.float64, generator=gen) * 3

    def logps(index: list[int], policy: bool = True) -> PairLogps:
        counts = torch.tensor([float(lengths[i]) for i in index], dtype=torch.float64)
        two = torch.full((len(index),), 2.0, dtype=torch.float64)
        if policy:
            return PairLogps(chosen[index], rejected[index], counts, two)
        return PairLogps(ref_chosen[index], ref_rejected[index], counts, two)

    def reference(index: list[int]) -> PairLogps | None:
        return logps(index, policy=False) if loss.needs_reference else None

    one, _ = BoundLoss(loss, reference(micro), len(micro) / len(chunk))(logps(micro))
    one_grad = torch.autograd.grad(one, (chosen, rejected), allow_unused=True, materialize_grads=True)
    total = torch.zeros((), dtype=torch.float64)
    for rank in range(size):
        index, stand_in = World(rank=rank, size=size).share(micro)
        part = 0.0 if stand_in else len(index) / len(chunk)
        world = World(rank=rank, size=size)
        bound = BoundLoss(loss, reference(index), part * size,
                          token_total=share_tokens(pairs, micro, index, world, stand_in))
        total = total + bound(logps(index))[0] / size  # DDP averages the ranks' gradients
    assert total.item() == pytest.approx(one.item(), rel=1e-12)
    grads = torch.autograd.grad(total, (chosen, rejected), allow_unused=True, materialize_grads=True)
    for got, expected in zip(grads, one_grad):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
