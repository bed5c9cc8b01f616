"""``eval_samples``: the policy's greedy completions of held-out prompts at each evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import get_plugin_manager, get_registry, hookimpl, run
from preftune.loop import Data, make_format, prepare_data
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.tiny import tiny_tokenizer


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tokenized(config: Any) -> Data:
    """The run's own tokenized pairs and split (the same seed makes the same split)."""
    registry = get_registry()
    return prepare_data(config, registry, make_format(registry, config), tiny_tokenizer())


def greedy(model: Any, prompt: list[int], max_tokens: int, stop: list[int]) -> list[int]:
    """One prompt, no padding, transformers' own greedy loop: what a sample must equal."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(out) if t in stop]
    return out[:ends[0] + 1] if ends else out


def test_samples_are_the_final_policys_greedy_completions_of_held_out_prompts(
        make_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    config = make_config(eval_samples=3, eval_sample_tokens=6, eval_interval=3, epochs=2,
                         sinks=["jsonl", "console"])
    summary = run(config)
    samples = rows(Path(config.log_path) / "samples.jsonl")
    steps = sorted({r["step"] for r in samples})
    assert summary["steps"] == 10 and steps == [0, 3, 6, 9, 10]  # every evaluation
    assert all(sum(r["step"] == s for r in samples) == 3 for s in steps)

    tokenizer = tiny_tokenizer()
    data = tokenized(config)
    held_out = [data.pairs[i] for i in data.eval[:3]]
    final = [r for r in samples if r["step"] == steps[-1]]
    assert [r["index"] for r in final] == data.eval[:3]
    assert [r["source"] for r in final] == [str(p.source) for p in held_out]
    assert [r["prompt"] for r in final] == [tokenizer.decode(p.prompt, skip_special_tokens=True)
                                            for p in held_out]
    assert [r["chosen"] for r in final] == [tokenizer.decode(p.chosen, skip_special_tokens=True)
                                            for p in held_out]
    model = AutoModelForCausalLM.from_pretrained(str(Path(config.log_path) / "final")).eval()
    stop = [tokenizer.eos_token_id]
    for row, pair in zip(final, held_out):
        expected = greedy(model, list(pair.prompt), 6, stop)
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["new_tokens"] == len(expected) and row["stopped"] == (expected[-1] in stop)
    assert f"sample @ step 10 (and 2 more): {final[0]['completion']!r}" in capsys.readouterr().err
    first = [r for r in samples if r["step"] == 0]
    assert [r["completion"] for r in first] != [r["completion"] for r in final]  # it learned


def test_lora_samples_use_the_adapter(make_config: Any) -> None:
    from peft import PeftModel

    from preftune.tiny import tiny_model

    config = make_config(eval_samples=2, eval_sample_tokens=5, lora_rank=4, learning_rate=1e-2)
    run(config)
    final = [r for r in rows(Path(config.log_path) / "samples.jsonl") if r["step"] > 0]
    assert len(final) == 2
    model = PeftModel.from_pretrained(tiny_model(), str(Path(config.log_path) / "final")).eval()
    tokenizer = tiny_tokenizer()
    data = tokenized(config)
    for row in final:
        expected = greedy(model, list(data.pairs[row["index"]].prompt), 5, [tokenizer.eos_token_id])
        assert row["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    with model.disable_adapter():  # and the base alone says something else
        base = greedy(model, list(data.pairs[final[0]["index"]].prompt), 5, [tokenizer.eos_token_id])
    assert final[0]["completion"] != tokenizer.decode(base, skip_special_tokens=True)


class NoSampling(LocalBackend):
    sample = None  # a backend without the verb


class NoSamplingPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register("nosample", NoSampling, LocalOptions)


def test_a_backend_that_cannot_sample_says_so_once_and_trains_on(
        make_config: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pm = get_plugin_manager()
    pm.register(NoSamplingPlugin(), name="nosample-plugin")
    config = make_config(backend="nosample", eval_samples=2, eval_interval=2)
    summary = run(config, pm)
    assert summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("'nosample' backend cannot generate text") == 1
    assert not (Path(config.log_path) / "samples.jsonl").exists()


def test_more_samples_than_held_out_pairs_samples_them_all(
        make_config: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(eval_samples=50, eval_sample_tokens=2)
    run(config)
    samples = rows(Path(config.log_path) / "samples.jsonl")
    assert len(samples) == 2 * 6  # 24 pairs, a quarter held out, sampled at the start and the end
    assert "eval_samples = 50, but there are 6 held-out pairs: sampling 6" in capsys.readouterr().err


def test_generation_is_greedy_whatever_the_models_own_generation_settings(make_config: Any) -> None:
    """A chat model's generation config (a repetition penalty, no repeated n-grams, a minimum
    length) does not reach the samples: they are the plain argmax, step by step, in batches."""
    from preftune.tiny import tiny_model

    backend = LocalBackend(make_config(batch_size=2), LocalOptions(), tiny_tokenizer())
    hf = backend.model
    hf.generation_config.repetition_penalty = 5.0
    hf.generation_config.no_repeat_ngram_size = 1
    hf.generation_config.min_new_tokens = 12
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]  # unequal lengths; 3 prompts in batches of 2
    got = backend.sample(prompts, 10, [])
    plain = tiny_model().eval()
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                ids.append(int(plain(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
    assert hf.generation_config.repetition_penalty == 5.0  # the model's own settings are left as they were
    stop = got[0][2]  # a token the first completion reaches: it ends there, that token included
    assert backend.sample(prompts[:1], 10, [stop])[0] == got[0][: got[0].index(stop) + 1]
