"""The ``tinker`` backend's ``sample`` verb, through the real ``tinker`` client against the emulator,
held to transformers' own greedy generation by the emulator's model."""

from __future__ import annotations

import json
import pickle
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from preftune import TrainingError
from preftune.plugins.remote import RemoteError
from preftune.plugins.tinker import TinkerBackend, TinkerOptions

PROMPTS = ["Tell me about cats.", "Hi"]
TARGETS = [" Cats are lovely animals, they purr.", " Hello there, friend!"]


@pytest.fixture
def backend(make_config: Any, emulator: Any, tokenizer: Any) -> Iterator[TinkerBackend]:
    config = make_config(backend="tinker", lora_rank=4)
    options = TinkerOptions(base_url=emulator.url, timeout_s=30, connect_timeout_s=2)
    backend = TinkerBackend(config, options, tokenizer)
    yield backend
    backend.close()


def policy(emulator: Any, backend: TinkerBackend) -> Any:
    """The emulator's model of the backend's policy, read in this process."""
    return emulator.emulator.models[backend.client.model_id]["trainer"].model


def greedy(model: Any, prompt: list[int], max_tokens: int, stop: list[int]) -> list[int]:
    """transformers' greedy generation: the new tokens."""
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop or None,
                              pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


def train(backend: TinkerBackend, prompts: list[list[int]], targets: list[list[int]], steps: int) -> None:
    """``steps`` steps of cross-entropy on ``prompt + target`` through the SDK's training client."""
    data = [backend.datum((p + t)[:-1], (p + t)[1:], [0.0] * (len(p) - 1) + [1.0] * len(t))
            for p, t in zip(prompts, targets)]
    for _ in range(steps):
        backend.client.forward_backward(data, "cross_entropy").result()
        backend.client.optim_step(backend.types.AdamParams(learning_rate=0.01)).result()


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [tokenizer.encode(text) for text in texts]


def test_samples_are_the_greedy_generation_of_the_current_weights(
        backend: TinkerBackend, emulator: Any, tokenizer: Any) -> None:
    prompts = encode(tokenizer, PROMPTS)
    assert len(prompts[0]) != len(prompts[1])
    before = backend.sample(prompts, 12, [])
    assert before == [greedy(policy(emulator, backend), p, 12, []) for p in prompts]
    assert all(type(t) is int for row in before for t in row)

    train(backend, prompts, encode(tokenizer, TARGETS), steps=20)
    after = backend.sample(prompts, 12, [])
    assert after != before  # the sampler save is of the weights now
    assert after == [greedy(policy(emulator, backend), p, 12, []) for p in prompts]
    assert [len(row) for row in after] == [12, 12]  # no stop tokens: max_tokens each

    # a stop token that the first completion reaches mid-way and the second never does
    k = next(i for i, t in enumerate(after[0]) if i >= 2 and t not in after[0][:i] and t not in after[1])
    stopped = backend.sample(prompts, 12, [after[0][k]])
    assert stopped == [after[0][: k + 1], after[1]]
    assert stopped == [greedy(policy(emulator, backend), p, 12, [after[0][k]]) for p in prompts]
    assert backend.sample([], 12, []) == []


def test_a_sampler_serves_the_weights_saved_for_it(backend: TinkerBackend, emulator: Any,
                                                   tokenizer: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[:1])
    params = backend.types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])

    def tokens(sampler: Any) -> list[int]:
        model_input = backend.types.ModelInput.from_ints(prompt[0])
        return list(sampler.sample(model_input, 1, params).result().sequences[0].tokens)

    early = backend.client.save_weights_and_get_sampling_client().result()
    named = backend.client.save_weights_for_sampler("early").result().path
    before = tokens(early)
    train(backend, prompt, encode(tokenizer, TARGETS[:1]), steps=20)
    assert backend.sample(prompt, 10, []) != [before]
    assert tokens(early) == before  # not whatever the trainer holds later
    assert tokens(pickle.loads(pickle.dumps(early))) == before  # as a worker process gets it
    assert tokens(backend.sdk.create_sampling_client(model_path=named).result()) == before
    again = backend.client.save_weights_for_sampler("early").result().path  # the same name, saved again
    assert [tokens(backend.sdk.create_sampling_client(model_path=again).result())] == backend.sample(
        prompt, 10, [])
    # the base model: the LoRA adapter starts as the identity
    assert tokens(backend.sdk.create_sampling_client(base_model="builtin:tiny").result()) == before
    # temperature sampling: seeded, so a request made again draws the same; samples differ
    hot = backend.types.SamplingParams(max_tokens=10, temperature=2.0, seed=7, stop=[])
    model_input = backend.types.ModelInput.from_ints(prompt[0])
    draws = [[list(s.tokens) for s in early.sample(model_input, 2, hot).result().sequences]
             for _ in range(2)]
    assert draws[0] == draws[1] and draws[0][0] != draws[0][1] and len(draws[0][0]) == 10
    top_k = backend.types.SamplingParams(max_tokens=10, top_k=5)
    with pytest.raises(backend.tinker.BadRequestError, match="not emulated: top_k = 5"):
        early.sample(model_input, 1, top_k).result(timeout=30)
    joined = [post(emulator.url, "/api/v1/join_sampling_session",
                   {"sampling_session_id": early._sampling_session_id}) for _ in range(2)]
    assert [answer["client_counter"] for answer in joined] == [1, 2]
    requests = [r.path for r in emulator.emulator.requests]
    assert {"/api/v1/asample", "/api/v1/create_sampling_session"} <= set(requests)
    assert any(path.startswith("/api/v1/samplers/") for path in requests)  # its base model, by id


def test_prompt_logprobs_are_the_trainers_own(backend: TinkerBackend, emulator: Any,
                                              tokenizer: Any) -> None:
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    sampler = backend.client.save_weights_and_get_sampling_client().result()
    got = sampler.compute_logprobs(backend.types.ModelInput.from_ints(prompt)).result()
    logits = policy(emulator, backend)(input_ids=torch.tensor([prompt])).logits[0, :-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(prompt[1:])[:, None])
    assert got[0] is None
    assert got[1:] == pytest.approx(expected.squeeze(-1).tolist(), abs=1e-5)


def test_service_faults_are_retried_or_clear_errors(backend: TinkerBackend, emulator: Any,
                                                   tokenizer: Any) -> None:
    prompts = encode(tokenizer, PROMPTS)
    clean = backend.sample(prompts, 6, [])
    emulator.emulator.faults.errors.update({"/api/v1/asample": 2, "/api/v1/save_weights_for_sampler": 1})
    assert backend.sample(prompts, 6, []) == clean  # the SDK retries a 503
    assert set(emulator.emulator.faults.errors.values()) == {0}

    # the service is gone: no new connections, and the SDK's open keep-alive ones are closed unanswered
    emulator.__exit__()
    emulator.emulator.faults.drops[""] = 10**6
    backend.options.timeout_s, backend.options.retries, backend.options.connect_timeout_s = 2, 0, 0.5
    with pytest.raises(RemoteError, match=r"tinker: saving the weights for sampling: no result within 2 s "
                                          r"\(session session-\d+\)") as caught:
        backend.sample(prompts, 6, [])
    assert isinstance(caught.value, TrainingError) and caught.value.transient
