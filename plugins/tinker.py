"""The ``tinker`` backend: the policy is a LoRA adapter trained on Tinker's service.

Through the real ``tinker`` SDK: ``ServiceClient(base_url, api_key)``, then
``create_lora_training_client``. Tinker trains LoRA adapters only. A LoRA adapter starts as the
identity, so the reference log-probs are the policy's before its first step (``lora_shared``, the
default), or those of a second adapter that is never stepped (``separate``). Training runs the
run's loss client-side with ``forward_backward_custom``; checkpoints name the service's saved
state and resume with ``create_training_client_from_state_with_optimizer``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from pydantic import Field

from preftune import Config, ConfigError, TrainingError, hookimpl, log, mask_secrets
from preftune.plugins import remote

HEALTH = "/api/v1/healthz"  # the SDK's health check (resources/service.py)
CLOSE_STATUS = {"completed": "success", "stopped": "interrupted"}  # anything else: errored


class TinkerOptions(remote.RemoteOptions):
    """Options of the ``[tinker]`` table."""

    api_key_env: str = Field("TINKER_API_KEY", description="Environment variable holding the key.")
    train_unembed: bool = Field(False, description="Also adapt the output layer (the local backend's "
                                "'all-linear' does not).")


def check_settings(config: Config, options: TinkerOptions) -> None:
    """What the run cannot use, refused before anything loads."""
    if config.lora_rank <= 0:
        raise ConfigError("backend 'tinker' trains LoRA adapters only: set lora_rank > 0 "
                          "(lora_rank = 0 asks for a full fine-tune)")
    if config.init_from:
        raise ConfigError("backend 'tinker' does not take init_from; start from a Tinker "
                          "checkpoint by resuming a run")
    if "lora_alpha" in config.model_fields_set:
        raise ConfigError(f"lora_alpha = {config.lora_alpha}: Tinker sets LoRA alpha itself; leave "
                          "lora_alpha unset with backend 'tinker'")
    remote.check_url(options.base_url, "tinker.base_url")
    options.api_key("a Tinker key starts with 'tml-'")
    remote.import_sdk("tinker", "tinker")
    url = options.base_url or os.environ.get("TINKER_BASE_URL")
    if url:  # else the SDK's own; its first call is bounded like every other
        remote.check_reachable(url, options.connect_timeout_s, HEALTH, "Tinker")


class TinkerBackend(remote.TrainingClientBackend):
    """See the module docstring."""

    check = staticmethod(check_settings)

    def __init__(self, config: Config, options: TinkerOptions, tokenizer: Any):
        self.tinker = self.types = remote.import_sdk("tinker", "tinker")
        self.config, self.options = config, options
        self.url = options.base_url or os.environ.get("TINKER_BASE_URL")
        self.shown_url = mask_secrets(self.url or "default")  # a password in it is never shown
        errors = self.tinker.TinkerError
        self.service = remote.Service("tinker", options, (errors,), (
            self.tinker.APIConnectionError, self.tinker.InternalServerError, self.tinker.RateLimitError))
        key = options.api_key("a Tinker key starts with 'tml-'")
        self.service.where = f"service {self.shown_url}"  # until the session has an id
        self.sdk = self.tinker.ServiceClient(base_url=self.url, api_key=key,
                                             user_metadata={"client": "preftune"})
        try:
            self.client = self._new_adapter("creating the LoRA training client")
        except BaseException:
            self.close("failed")
            raise
        self.service.where = f"session {self.client.holder.get_session_id()}"
        self.stepped = False

    def _new_adapter(self, what: str) -> Any:
        create = self.sdk.create_lora_training_client
        future = self.service.run(what, lambda: create(
            self.config.base_model, rank=self.config.lora_rank, seed=self.config.seed,
            train_unembed=self.options.train_unembed))
        client = self.service.wait(what, future)
        log(f"tinker: {what.removeprefix('creating ')} is model {client.model_id}")
        return client

    def identity(self) -> dict[str, str]:
        return {"backend": "tinker", "service": self.shown_url,
                "base_model": self.config.base_model}

    def default_reference(self) -> str:
        return "lora_shared"

    def reference_client(self, shared: bool) -> remote.ReferenceClient:
        """The policy before its first step (``shared``), or an adapter never stepped."""
        if shared:
            return remote.ReferenceClient(self, self.client, policy=True)
        return remote.ReferenceClient(self, self._new_adapter("creating the reference adapter"))

    def save_state(self, path: str) -> None:
        name = self.checkpoint_name("state")
        saved = self.service.call("save_state", lambda: self.client.save_state(name), repeatable=True)
        remote.write_state(path, {"backend": "tinker", "state": saved.path,
                                  "base_model": self.config.base_model})

    def load_state(self, path: str) -> None:
        state = remote.read_state(path)
        create = self.sdk.create_training_client_from_state_with_optimizer
        self.client = self.service.call("loading state " + state["state"],
                                        lambda: create(state["state"]), repeatable=True)
        self.stepped = True
        log(f"tinker: resumed from {state['state']}")

    def save_weights(self, path: str) -> dict[str, Any]:
        name = self.checkpoint_name("weights")
        saved = self.service.call("save_weights_for_sampler",
                                  lambda: self.client.save_weights_for_sampler(name), repeatable=True)
        remote.write_state(path, {"backend": "tinker", "sampler_weights": saved.path,
                                  "base_model": self.config.base_model,
                                  "lora_rank": self.config.lora_rank})
        return {"remote_weights": saved.path}

    def publish_weights(self, snapshot: str, step: int, deployment_id: str,
                        directory: str | None, keep: int) -> dict[str, Any]:
        """Tinker serves sampler weights by path: publishing saves them and names the path."""
        saved = self.service.call("save_weights_for_sampler",
                                  lambda: self.client.save_weights_for_sampler(snapshot),
                                  repeatable=True)
        return {"snapshot": snapshot, "step": step, "deployment_id": deployment_id,
                "path": saved.path, "created": time.time()}

    def sample(self, prompts: Sequence[Sequence[int]], max_tokens: int, stop: Sequence[int]
               ) -> list[list[int]]:
        """Greedy (temperature 0) completions of the current policy weights for each prompt (token
        ids, the prompt not repeated), at most ``max_tokens`` new tokens each, ending at the first
        token in ``stop`` (that token included) or at max_tokens."""
        if not prompts:
            return []
        # The service samples only from saved sampler weights, so every evaluation costs one extra
        # save of the adapter (weights only, no optimizer state: lighter than a checkpoint's
        # save_state) and a sampler loading it. Saved without a name, it is ephemeral: the service
        # does not keep it as a checkpoint. One sampling client serves all of the evaluation's prompts.
        sampler = self.service.call("saving the weights for sampling",
                                    self.client.save_weights_and_get_sampling_client, repeatable=True)
        params = self.types.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           stop=[int(t) for t in stop])  # [] stops at max_tokens only
        pending = [self.service.pending(
            "sample", partial(sampler.sample, self.types.ModelInput.from_ints([int(t) for t in prompt]),
                              1, params), _completion, repeatable=True) for prompt in prompts]
        return [p.result() for p in pending]  # all submitted before any is awaited

    def close(self, status: str = "completed") -> None:
        """Finish the session: the service releases what it holds for this run."""
        sdk, self.sdk = self.sdk, None
        if sdk is None:
            return
        # in a daemon thread, bounded like the calls it cleans up after: the SDK's close blocks
        # while one of its calls is still stuck (a server that answers HTML, say)
        bound = self.options.connect_timeout_s
        try:
            self.service.run("closing the session", lambda: (
                sdk.close(CLOSE_STATUS.get(status, "errored")).result(timeout=bound)), bound)
        except remote.RemoteError as exc:  # the run's own outcome matters more than a failed goodbye
            log(f"{exc}; the service ends the session itself when its heartbeats stop")
        except Exception as exc:
            log(f"tinker: closing the session failed: {remote.describe(exc)}")


def _completion(response: Any) -> list[int]:
    """The one sequence of a sample response, as plain ints."""
    if len(response.sequences) != 1:
        raise TrainingError(f"tinker: sample: the service returned {len(response.sequences)} "
                            "sequences for one")
    return [int(t) for t in response.sequences[0].tokens]


@hookimpl
def register_backends(register: Any) -> None:
    register("tinker", TinkerBackend, TinkerOptions)
