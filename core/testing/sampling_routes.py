"""Tinker's sampling API: sampler saves, sampling sessions and ``asample``.

The ``tinker`` SDK samples in three steps. A sampler save (``save_weights_for_sampler`` with no
name, which is what ``TrainingClient.save_weights_and_get_sampling_client`` sends) saves the
training model's current weights and answers with a sampling session bound to them; or
``create_sampling_session`` binds one to named sampler weights (``create_sampling_client``) or to
the base model. ``asample`` then generates from that session's weights, whatever the trainer
holds by then, and the result comes back through ``retrieve_future`` as protobuf (the SDK takes
a ``SampleResponse`` no other way). Generation is :func:`preftune.testing.trainer.generate`.

Served: greedy (``temperature`` 0) and plain temperature sampling, stop token ids (``None``: the
model's end-of-sequence tokens; ``[]``: none), ``num_samples``, and prompt log-probs (what
``compute_logprobs`` asks for). Refused with a 400 that says so: stop strings, ``top_k``/``top_p``,
top-k log-probs, target prompt log-probs and prompt draws. The client config's sampling switches
(``sample_use_retrieve_futures``, ``sample_join_sampling_session``) stay off, so the SDK polls
each sample's own future; ``join_sampling_session`` is served all the same.
"""

from __future__ import annotations

import math
import re
import secrets
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import session_routes
from .exchange import Answer, Reply, Request
from .trainer import Generation, Trainer, generate

if TYPE_CHECKING:
    from .emulator import Emulator

PROTO = "application/x-protobuf"
DEFAULTS = {"top_k": -1, "top_p": 1.0, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0,
            "prompt_alt_tokens_k": 0, "target_prompt_logprobs": None}  # what is not emulated


@dataclass
class Sampler:
    """A sampling session: the base model, and the sampler weights it serves (``None``: the
    base model's own)."""

    base_model: str
    weights: dict[str, Any] | None
    model_path: str | None = None
    clients: int = 0  # clients that joined it (the original one is 0)


@dataclass
class Samplers:
    """An emulator's sampling sessions, and one model per LoRA shape to generate with (the
    weights of the sampler being served are loaded into it)."""

    table: dict[str, Sampler] = field(default_factory=dict)
    models: dict[tuple[Any, ...], tuple[Trainer, Any]] = field(default_factory=dict)  # and what it holds


_SAMPLERS: weakref.WeakKeyDictionary[Emulator, Samplers] = weakref.WeakKeyDictionary()


def samplers(emu: Emulator) -> Samplers:
    """The sampling state of ``emu`` (kept here, beside the emulator's own)."""
    return _SAMPLERS.setdefault(emu, Samplers())


def _new_sampler(emu: Emulator, sampler: Sampler) -> str:
    # unique across emulators: the SDK keeps a retry handler per sampling session id
    sampler_id = f"sampler-{secrets.token_hex(4)}-{next(emu.ids)}"
    samplers(emu).table[sampler_id] = sampler
    return sampler_id


def _sampler(emu: Emulator, sampler_id: str) -> Sampler:
    sampler = samplers(emu).table.get(sampler_id)
    if sampler is None:
        raise Reply(404, f"unknown sampling session {sampler_id!r}")
    return sampler


def save_for_sampler(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    """A sampler save with no name (``sampling_session_seq_id`` instead): the training model's
    weights now, and a sampling session on them. A named one is an ordinary sampler save."""
    body = req.json()
    if body.get("path") is not None or body.get("sampling_session_seq_id") is None:
        return session_routes.save_sampler(emu, req, m)
    model = session_routes._model(emu, body["model_id"])
    trainer: Trainer = model["trainer"]
    directory = emu.root / "samplers" / secrets.token_hex(8)
    with emu.lock:
        trainer.save(directory, optimizer=False)
    weights = {"rank": model["rank"], "alpha": model["alpha"], "dir": directory,
               "train_unembed": trainer.train_unembed}
    sampler_id = _new_sampler(emu, Sampler(model["base_model"], weights))
    return emu.future(Answer(body={"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}))


def create_sampling_session(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, str]:
    body = req.json()
    path, base_model = body.get("model_path"), body.get("base_model")
    if path:
        saved = emu.saved.get((path, "sampler_weights"))
        if saved is None or saved.get("kind") != "sampler_weights":
            raise Reply(404, f"no sampler weights at {path} (save them with save_weights_for_sampler)")
        sampler = Sampler(saved["base_model"], saved, model_path=path)
    elif base_model:
        sampler = Sampler(base_model, None)
    else:
        raise Reply(400, "create_sampling_session needs model_path or base_model")
    return {"type": "create_sampling_session", "sampling_session_id": _new_sampler(emu, sampler)}


def join_sampling_session(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    sampler = _sampler(emu, req.json()["sampling_session_id"])
    sampler.clients += 1
    return {"type": "join_sampling_session", "client_counter": sampler.clients}


def get_sampler(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    sampler = _sampler(emu, m["sampler"])
    return {"sampler_id": m["sampler"], "base_model": sampler.base_model, "model_path": sampler.model_path}


def asample(emu: Emulator, req: Request, m: re.Match[str]) -> dict[str, Any]:
    """``num_samples`` completions of the prompt by the sampling session's weights."""
    body = req.json()
    sampler_id = body.get("sampling_session_id")
    if not sampler_id:
        raise Reply(400, "the emulator samples by sampling_session_id only (the SDK's way since 0.30)")
    sampler = _sampler(emu, sampler_id)
    params = body.get("sampling_params") or {}
    _refuse_what_is_not_emulated(body, params)
    prompt = [int(t) for chunk in body["prompt"]["chunks"] for t in chunk["tokens"]]
    count = int(body.get("num_samples") or 1)
    with emu.lock:
        model = _generator_model(emu, sampler)
        generator = torch.Generator().manual_seed(int(params.get("seed") or 0))
        stop = _stop_tokens(params.get("stop"), model)
        outputs = [generate(model, prompt, int(params["max_tokens"]), stop,
                            float(params.get("temperature", 1.0)), generator) for _ in range(count)]
        prompt_logps = _prompt_logprobs(model, prompt, body) if body.get("prompt_logprobs") else None
    ids = [f"{sampler_id}:{body.get('seq_id', 0)}:{k}" for k in range(count)]
    answer = Answer(body=encode_sample_response(outputs, prompt_logps), content_type=PROTO)
    return emu.future(answer) | {"sample_sequence_ids": ids}


def _refuse_what_is_not_emulated(body: dict[str, Any], params: dict[str, Any]) -> None:
    settings = {**body, **params}
    odd = [f"{k} = {settings[k]!r}" for k, v in DEFAULTS.items() if settings.get(k, v) != v]
    if odd:
        raise Reply(400, f"not emulated: {', '.join(odd)} (greedy or temperature sampling only)")
    if params.get("max_tokens") is None:
        raise Reply(400, "sampling_params.max_tokens is required by the emulator")
    stop = params.get("stop")
    if isinstance(stop, str) or any(isinstance(s, str) for s in stop or []):
        raise Reply(400, f"stop strings are not emulated (stop = {stop!r}): give token ids")


def _stop_tokens(stop: list[int] | None, model: Any) -> set[int]:
    """``stop`` as a set; ``None`` keeps the model's own end-of-sequence tokens."""
    if stop is not None:
        return {int(t) for t in stop}
    eos = getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _generator_model(emu: Emulator, sampler: Sampler) -> Any:
    """The model to generate with, holding the sampler's weights: one per LoRA shape, kept
    between requests, the weights loaded again when another sampler is served."""
    weights = sampler.weights or {"rank": 0, "alpha": emu.lora_alpha, "train_unembed": False}
    shape = (sampler.base_model, weights["rank"], weights["alpha"], weights["train_unembed"])
    trainer, loaded = samplers(emu).models.get(shape, (None, None))
    if trainer is None:
        trainer = emu.trainer(sampler.base_model, lora_rank=weights["rank"], lora_alpha=weights["alpha"],
                              forward_only=True, train_unembed=weights["train_unembed"])
    directory = weights.get("dir")
    # a named save made again under its name replaces the files: its time tells them apart
    holds = (directory, (directory / "weights.pt").stat().st_mtime_ns) if directory else None
    if holds is not None and holds != loaded:
        trainer.load(directory, optimizer=False)
    samplers(emu).models[shape] = (trainer, holds)
    return trainer.model


def _prompt_logprobs(model: Any, prompt: list[int], body: dict[str, Any]) -> list[float]:
    """Each prompt token's log-prob given the ones before it; NaN for the first, and for all
    but the last ``prompt_logprobs_last_n``."""
    with torch.inference_mode():
        logps = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, :-1].float(), -1)
        rows = logps.gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1).tolist()
    values = [math.nan] + rows
    last = body.get("prompt_logprobs_last_n")
    return values if last is None else [math.nan] * (len(values) - int(last)) + values[-int(last):]


def encode_sample_response(outputs: list[Generation], prompt_logprobs: list[float] | None) -> bytes:
    """A ``tinker_public_pb2.SampleResponse``, the wire form the SDK reads a sample result in."""
    from tinker.proto import tinker_public_pb2 as pb

    reasons = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
    message = pb.SampleResponse()
    for out in outputs:
        message.sequences.add(stop_reason=reasons[out.stop_reason],
                              tokens=np.asarray(out.tokens, dtype=np.int32).tobytes(),
                              logprobs=np.asarray(out.logprobs, dtype=np.float32).tobytes())
    if prompt_logprobs is not None:
        message.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return message.SerializeToString()


ROUTES = [
    ("POST", "/api/v1/save_weights_for_sampler", save_for_sampler),  # before session_routes' own
    ("POST", "/api/v1/create_sampling_session", create_sampling_session),
    ("POST", "/api/v1/join_sampling_session", join_sampling_session),
    ("GET", "/api/v1/samplers/(?P<sampler>[^/]+)", get_sampler),
    ("POST", "/api/v1/asample", asample),
]
