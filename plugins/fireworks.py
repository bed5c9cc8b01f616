"""The ``fireworks`` backend: the policy trains on a Fireworks trainer job.

Through the real ``fireworks.training.sdk`` (package ``fireworks-ai``), as the cookbook's DPO recipe
provisions it: a ``TrainerJobManager`` creates a service-mode trainer job for the policy (or
attaches to ``job_id``) and a ``FiretitanServiceClient`` on the job's URL creates the training
client, full-parameter or LoRA. The reference is, with LoRA, the policy session's base model
(``create_reference_client``: no second job), and for a full fine-tune a separate forward-only
trainer job that is deleted as soon as the reference cache is complete. The run's loss runs
client-side (``forward_backward_custom``); checkpoints name the trainer's saved state and resume
with ``load_state_with_optimizer``; weight sync saves sampler weights and hot-loads a deployment.

Every job the run creates is recorded in ``log_path/fireworks_jobs.json`` before it is created and
deleted when the run ends, however it ends; jobs left by a killed run are deleted by the next run on
that ``log_path`` (after a resume has loaded its state from them). Jobs named in the config are
used and never deleted. A deleted job's saved state is not documented as loadable by another job,
so a run whose checkpoint's state went with its job says so instead of promising a resume
(``resume_advice``); with ``keep_job_on_interrupt`` a run that does not complete keeps the job
holding its newest checkpoint's state, and the run that resumes from it deletes it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from preftune import Config, ConfigError, TrainingError, hookimpl, log, mask_secrets
from preftune.backend_utils import atomic_write_json
from preftune.plugins import fireworks_promote, remote

SDK = "fireworks.training.sdk"
DEFAULT_URL = "https://api.fireworks.ai"
JOBS_FILE = "fireworks_jobs.json"
GONE = ("JOB_STATE_DELETING", "JOB_STATE_DELETED", "JOB_STATE_ARCHIVED")


class FireworksOptions(remote.RemoteOptions):
    """Options of the ``[fireworks]`` table (names follow the cookbook's ``TrainerConfig``)."""

    api_key_env: str = Field("FIREWORKS_API_KEY", description="Environment variable holding the key.")
    trainer_gateway_url: str | None = Field(None, description="Host of the trainer jobs' URLs "
                                            "(default base_url).")
    training_shape_id: str | None = Field(None, description="Training shape of the policy job.")
    reference_training_shape_id: str | None = Field(None, description="Shape of the reference job.")
    job_id: str | None = Field(None, description="Use this existing policy trainer job (never deleted).")
    reference_job_id: str | None = Field(None, description="Use this existing reference job.")
    region: str | None = Field(None, description="Region of the jobs this run creates.")
    output_model_id: Annotated[str | None, AfterValidator(fireworks_promote.check_model_id)] = Field(
        None, description="Promote the final weights to this model id.", json_schema_extra=remote.OPERATIONAL)
    trainer_timeout_s: float = Field(3600.0, gt=0, description="Longest wait for a job to be ready.",
                                     json_schema_extra=remote.OPERATIONAL)
    poll_interval_s: float = Field(5.0, gt=0, description="Seconds between job status polls.",
                                     json_schema_extra=remote.OPERATIONAL)
    hotload_timeout_s: float = Field(600.0, gt=0, description="Longest wait for a hot-load.",
                                     json_schema_extra=remote.OPERATIONAL)
    warmup_after_hotload: bool = Field(True, description="Send one request after each hot-load.")
    train_unembed: bool = Field(False, description="LoRA: also adapt the output layer (the local "
                                "backend's 'all-linear' does not).")
    keep_job_on_interrupt: bool = Field(
        False, description="On SIGTERM, Ctrl-C or a failure, keep the policy trainer job that holds "
        "the newest checkpoint's state, so that --resume can load it (it costs money until the "
        "resumed run deletes it); off, the job is deleted and the run cannot be resumed.",
        json_schema_extra=remote.OPERATIONAL)


class Jobs:
    """The trainer jobs this run created: recorded before creation, deleted at the end."""

    def __init__(self, log_path: str, manager: Any, service: remote.Service, bound: float):
        self.file = Path(log_path) / JOBS_FILE
        self.manager, self.service, self.bound = manager, service, bound
        self.created: list[str] = []
        self.confirmed: set[str] = set()  # jobs the service said it created
        self.gone: set[str] = set()  # jobs this run deleted
        self.left = self._recorded()  # by a run on this log_path that was killed

    def _recorded(self) -> list[str]:
        if not self.file.exists():
            return []
        try:
            return [str(job) for job in json.loads(self.file.read_text())]
        except (OSError, ValueError, TypeError) as exc:
            log(f"fireworks: cannot read {self.file} ({exc}); trainer jobs an interrupted run "
                "left there are not deleted: check them in the Fireworks console")
            return []

    def _write(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, self.left + self.created)

    def new(self, role: str) -> str:
        job_id = f"preftune-{role}-{secrets.token_hex(4)}"
        self.created.append(job_id)
        self._write()
        return job_id

    def confirm(self, job_id: str) -> None:
        """The service said it created ``job_id``: from now on a failed deletion is advice."""
        self.confirmed.add(job_id)

    def settle(self, job_id: str, error: remote.RemoteError) -> None:
        """After asking for ``job_id`` failed: forget it if the service refused (it was never
        made); else it stays listed (its answer may have been lost) and deleting it is tried."""
        if error.refused:
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        for jobs in (self.created, self.left):
            if job_id in jobs:
                jobs.remove(job_id)
        self._write()

    def delete(self, job_id: str) -> None:
        try:  # the SDK's delete only logs a failure: the job's state says whether it is gone
            self.service.run(f"deleting trainer job {job_id}", lambda: self.manager.delete(job_id),
                             self.bound)
            job = self.service.run(f"checking trainer job {job_id}",
                                   lambda: self.manager.try_get(job_id), self.bound)
        except Exception as exc:
            if job_id in self.confirmed or job_id in self.left:
                log(f"fireworks: could not delete trainer job {job_id} ({exc}); delete it by hand")
            else:
                log(f"fireworks: could not check whether trainer job {job_id} was created ({exc}); "
                    f"it stays listed in {self.file.name}, and the next run on this log_path "
                    "deletes it if it exists")
            return
        if job is not None and job.get("state") not in GONE:
            log(f"fireworks: trainer job {job_id} is still {job.get('state')} after its deletion "
                f"was asked for; it stays listed in {self.file.name}: delete it by hand")
            return
        self.gone.add(job_id)
        self._forget(job_id)

    def ours(self, job_id: str | None) -> bool:
        """Whether ``job_id`` is a job this run or an interrupted one created (not the config's)."""
        return job_id is not None and (job_id in self.created or job_id in self.left)

    def delete_left(self) -> None:
        for job_id in list(self.left):
            log(f"fireworks: deleting trainer job {job_id}, left by an interrupted run")
            self.delete(job_id)

    def delete_all(self, keep: str | None = None) -> None:
        """Delete every job but ``keep``, which stays listed for the next run on this log_path."""
        for job_id in [job for job in self.created if job != keep]:
            self.delete(job_id)
        for job_id in [job for job in self.left if job != keep]:
            log(f"fireworks: deleting trainer job {job_id}, left by an interrupted run")
            self.delete(job_id)
        if not self.created and not self.left:
            self.file.unlink(missing_ok=True)


def check_settings(config: Config, options: FireworksOptions) -> None:
    """What the run cannot use, refused before anything loads."""
    if config.lora_rank > 0 and not float(config.lora_alpha).is_integer():
        raise ConfigError(f"lora_alpha = {config.lora_alpha}: the fireworks backend needs a whole number")
    if config.init_from:
        raise ConfigError("backend 'fireworks' does not take init_from; attach to a trainer "
                          "job with [fireworks] job_id, or resume a run")
    for key in ("base_url", "trainer_gateway_url"):
        remote.check_url(getattr(options, key), f"fireworks.{key}")
    if options.api_key("a Fireworks key; a 'tml-' key is a Tinker key").startswith("tml-"):
        raise ConfigError(f"{options.api_key_env} holds a Tinker key ('tml-...'): the fireworks "
                          "backend needs a Fireworks API key")
    remote.import_sdk(SDK, "fireworks")
    remote.check_reachable(service_url(options), options.connect_timeout_s)


def service_url(options: FireworksOptions) -> str:
    return (options.base_url or os.environ.get("FIREWORKS_BASE_URL") or DEFAULT_URL).rstrip("/")


class FireworksBackend(remote.TrainingClientBackend):
    """See the module docstring."""

    check = staticmethod(check_settings)

    def __init__(self, config: Config, options: FireworksOptions, tokenizer: Any):
        self.fw = self.types = remote.import_sdk(SDK, "fireworks")
        trainer = remote.import_sdk(f"{SDK}.trainer", "fireworks")
        self.config, self.options, self.trainer_types = config, options, trainer
        self.alpha = config.lora_alpha
        self.key = options.api_key("a Fireworks key")
        self.url = service_url(options)
        self.gateway = (options.trainer_gateway_url or self.url).rstrip("/")
        import httpx

        fw = self.fw  # the SDK's own errors, its REST calls' (httpx) and the job states it raises
        self.service = remote.Service("fireworks", options, (
            fw.TrainingError, fw.TrainingAPIError, httpx.HTTPError, RuntimeError, OSError),
            (fw.APIConnectionError, fw.APITimeoutError, httpx.TransportError))
        self.service.where = f"service {mask_secrets(self.url)}"  # until the policy's job has an id
        self.manager = trainer.TrainerJobManager(api_key=self.key, base_url=self.url,
                                                 trainer_gateway_url=self.gateway)
        self.jobs = Jobs(config.log_path, self.manager, self.service, options.connect_timeout_s * 3)
        if not config.resume:  # a resumed run may need their saved state; it deletes them later
            self.jobs.delete_left()
        self.clients: list[Any] = []  # service clients to close
        self.syncer: Any = None
        self.state_job: str | None = None  # the job holding the newest whole checkpoint's state
        self.saving: str | None = None  # the job of the state being saved into a checkpoint
        try:
            self.policy_job, self.sdk = self._trainer("policy", config.lora_rank, False,
                                                      options.training_shape_id, options.job_id)
            self.client = self.service.run("creating the training client", lambda: (
                self.sdk.create_training_client(config.base_model, lora_rank=config.lora_rank,
                                                seed=config.seed, lora_alpha=int(self.alpha),
                                                train_unembed=options.train_unembed)))
        except BaseException:
            self.close("failed")
            raise
        self.service.where = f"trainer job {self.policy_job}"

    def _trainer(self, role: str, lora_rank: int, forward_only: bool, shape: str | None,
                 existing: str | None) -> tuple[str, Any]:
        """A ready trainer job (created, or ``existing``) and a service client on its URL."""
        opts = self.options
        wait = dict(poll_interval_s=opts.poll_interval_s, timeout_s=opts.trainer_timeout_s)
        job_id = existing or self._create(role, lora_rank, forward_only, shape)
        log(f"fireworks: waiting for {role} trainer job {job_id}")
        ready = self.manager.wait_for_existing if existing else self.manager.wait_for_ready
        try:
            endpoint = self.service.run(f"waiting for {role} trainer job {job_id}",
                                        lambda: ready(job_id, **wait),
                                        opts.trainer_timeout_s + opts.connect_timeout_s)
        except remote.RemoteError as exc:
            raise TrainingError(f"fireworks: {role} trainer job {job_id} did not become ready: "
                                f"{exc}") from None
        client = self.service.run(f"connecting to trainer job {job_id}", lambda: (
            self.fw.FiretitanServiceClient(base_url=endpoint.base_url, api_key=self.key,
                                           max_retries=opts.retries)))
        self.clients.append(client)
        return job_id, client

    def _create(self, role: str, lora_rank: int, forward_only: bool, shape: str | None) -> str:
        """Ask the service for a new trainer job; its id, once the service confirms it."""
        job_id = self.jobs.new(role)  # listed before it is asked for: a kill may come meanwhile
        job = self.trainer_types.TrainerJobConfig(
            base_model=self.config.base_model, lora_rank=lora_rank, forward_only=forward_only,
            max_context_length=self.config.max_seq_len, learning_rate=self.config.learning_rate,
            training_shape_ref=shape, region=self.options.region, requested_job_id=job_id,
            display_name=f"preftune {role}")
        try:
            self.service.run(f"creating {role} trainer job {job_id}", lambda: self.manager.create(job))
        except remote.RemoteError as exc:
            self.jobs.settle(job_id, exc)
            raise
        self.jobs.confirm(job_id)
        return job_id

    def identity(self) -> dict[str, str]:
        return {"backend": "fireworks", "service": mask_secrets(self.url),
                "base_model": self.config.base_model}

    def default_reference(self) -> str:
        return "lora_shared" if self.config.lora_rank > 0 else "separate"

    def reference_client(self, shared: bool) -> remote.ReferenceClient:
        """With LoRA and ``shared``, the base model on the policy's own session; otherwise a
        forward-only trainer job, deleted when the reference pass is done."""
        if shared:
            client = self.service.run("creating the reference client", lambda: (
                self.sdk.create_reference_client(self.config.base_model)))
            return remote.ReferenceClient(self, client)
        opts = self.options
        job_id, sdk = self._trainer("reference", 0, True, opts.reference_training_shape_id,
                                    opts.reference_job_id)
        client = self.service.run("creating the reference client", lambda: (
            sdk.create_training_client(self.config.base_model, lora_rank=0)))

        def release() -> None:
            self._close_client(sdk)
            if job_id in self.jobs.created:
                self.jobs.delete(job_id)
                log(f"fireworks: reference trainer job {job_id} deleted (the cache is complete)")

        return remote.ReferenceClient(self, client, on_close=release)

    def save_state(self, path: str) -> None:
        name = self.checkpoint_name("state")
        saved = self.service.call("save_state", lambda: self.client.save_state(name), repeatable=True)
        remote.write_state(path, {"backend": "fireworks", "job": self.policy_job, "state": saved.path,
                                  "base_model": self.config.base_model})
        self.saving = self.policy_job  # the newest state once the checkpoint is whole

    def checkpoint_saved(self, path: str) -> None:
        """The checkpoint holding the state :meth:`save_state` saved is whole on disk: that job
        now holds the newest state, and a job kept for this run's resume is no longer needed (not
        before: a checkpoint cut short by a full disk or a kill leaves the kept job's the newest)."""
        self.state_job = self.saving
        self.jobs.delete_left()

    def load_state(self, path: str) -> None:
        state = remote.read_state(path)
        same_job = state.get("job") == self.policy_job
        name = state["state"] if same_job else f"cross_job://{state['job']}/{state['state']}"
        try:
            self.service.call(f"loading state {name}",
                              lambda: self.client.load_state_with_optimizer(name), repeatable=True)
        except remote.RemoteError as exc:
            raise self._unloadable(state["job"], name, exc) from None
        self.stepped, self.state_job = True, state["job"]
        log(f"fireworks: resumed from {name}")
        if self.options.keep_job_on_interrupt and self.jobs.ours(state["job"]):
            log(f"fireworks: trainer job {state['job']} is kept until this run saves a checkpoint "
                "of its own or completes (keep_job_on_interrupt)")
        else:
            self.jobs.delete_left()  # the interrupted run's jobs, now that their state is loaded

    def _unloadable(self, job_id: str, name: str, error: remote.RemoteError) -> TrainingError:
        """Why ``name`` could not be loaded: plainly, when the job that saved it is gone."""
        if job_id == self.policy_job:
            return error
        try:
            job = self.service.run(f"checking trainer job {job_id}", lambda: self.manager.try_get(job_id),
                                   self.options.connect_timeout_s * 3)
        except remote.RemoteError:
            return error
        if job is not None and job.get("state") not in GONE:
            return error
        return TrainingError(f"fireworks: cannot load {name}: trainer job {job_id}, which saved it, was "
                             "deleted, and a deleted job's state is not loadable ({error}); "
                             "[fireworks] keep_job_on_interrupt keeps it for a resume")

    def _save_sampler(self, name: str) -> Any:
        return self.service.run("save_weights_for_sampler", lambda: (  # 'base': a model on its own
            self.client.save_weights_for_sampler_ext(name, checkpoint_type="base")))

    def save_weights(self, path: str) -> dict[str, Any]:
        saved = self._save_sampler(self.checkpoint_name("final"))
        promoted: dict[str, Any] = {}
        if self.options.output_model_id:  # as the cookbook's recipe, right after its final save
            try:
                promoted["output_model"] = fireworks_promote.promote(
                    self.service, self.manager, self.policy_job, saved, self.options.output_model_id,
                    self.config.base_model, self.options.poll_interval_s)
            except TrainingError as exc:  # the weights are sound and saved: the run completes
                promoted["errors"] = [str(exc)]  # and `preftune run` exits 1 naming it
        remote.write_state(path, {"backend": "fireworks", "job": self.policy_job,
                                  "snapshot": saved.snapshot_name, "path": saved.path,
                                  "base_model": self.config.base_model,
                                  "lora_rank": self.config.lora_rank, **promoted})
        return {"remote_weights": saved.snapshot_name, **promoted}

    def _deployments(self) -> Any:
        deploy = remote.import_sdk(f"{SDK}.deployment", "fireworks")
        return deploy.DeploymentManager(api_key=self.key, base_url=self.url)

    def check_deployment(self, deployment_id: str) -> str | None:
        """What keeps ``deployment_id`` from taking hot-loads (None: it exists and is READY, or
        serves while the control plane still says CREATING, as the SDK's readiness check
        allows); a fault on the way raises :class:`RemoteError`."""
        manager, opts = self._deployments(), self.options
        info = self.service.run(f"checking deployment {deployment_id}",
                                lambda: manager.get(deployment_id), opts.connect_timeout_s * 3)
        if info is None:
            return (f"the service {mask_secrets(self.url)} has no such deployment; weight sync "
                    "hot-loads a deployment that exists: create it first, or name another")
        if info.state == "READY":
            return None
        if info.state in ("FAILED", "DELETING", "DELETED"):  # it will never take a hot-load
            return f"the deployment is {info.state}; weight sync needs one that can take hot-loads"
        try:  # one short look: the SDK's own readiness check, which probes a CREATING one
            self.service.run(f"waiting for deployment {deployment_id}", lambda: manager.wait_for_ready(
                deployment_id, timeout_s=opts.connect_timeout_s, poll_interval_s=opts.poll_interval_s),
                opts.connect_timeout_s * 3)
        except remote.RemoteError:  # still starting: the first hot-load (at the end, by default) waits
            log(f"fireworks: deployment {deployment_id} is {info.state}, not READY yet; training starts, "
                f"and the first hot-load waits for it (hotload_timeout_s = {opts.hotload_timeout_s:g})")
        return None

    def publish_weights(self, snapshot: str, step: int, deployment_id: str,
                        directory: str | None, keep: int) -> dict[str, Any]:
        """Save sampler weights and hot-load them into ``deployment_id`` (base, then deltas for a
        full fine-tune, as the SDK's ``WeightSyncer`` chains them)."""
        if self.syncer is None:
            syncer = remote.import_sdk(f"{SDK}.weight_syncer", "fireworks")
            self.syncer = syncer.WeightSyncer(
                policy_client=self.client, deploy_mgr=self._deployments(), deployment_id=deployment_id,
                base_model=self.config.base_model, hotload_timeout=int(self.options.hotload_timeout_s),
                warmup_after_hotload=self.options.warmup_after_hotload, lora_rank=self.config.lora_rank)
        name = snapshot.lower().replace("_", "-")
        loaded = self.service.run(f"hot-loading {name} into deployment {deployment_id}", lambda: (
            self.syncer.save_and_hotload(name)), self.options.hotload_timeout_s + self.options.timeout_s)
        if not loaded:
            raise TrainingError(f"fireworks: hot-loading {name} into deployment {deployment_id} failed")
        return {"snapshot": loaded, "step": step, "deployment_id": deployment_id,
                "trainer_job": self.policy_job}

    def _close_client(self, client: Any) -> None:
        if client in self.clients:
            self.clients.remove(client)
        try:  # bounded like the calls it cleans up after (a stuck call may hold the client)
            self.service.run("closing a service client", client.close, self.options.connect_timeout_s)
        except Exception as exc:
            log(f"fireworks: closing a service client failed: {remote.describe(exc)}")

    def close(self, status: str = "completed") -> None:
        """Close every client, then delete every trainer job this run created (or an interrupted
        one left), but the one ``keep_job_on_interrupt`` keeps for a resume."""
        for client in list(self.clients):
            self._close_client(client)
        keep = self._kept(status)
        self.jobs.delete_all(keep)
        if keep is not None:
            log(f"fireworks: trainer job {keep} is kept (keep_job_on_interrupt): it holds the newest "
                "checkpoint's state and costs money until it is deleted. The run that resumes with "
                "--resume loads it and deletes it; a run on this log_path without --resume deletes "
                "it too; or delete it in the Fireworks console")

    def _kept(self, status: str) -> str | None:
        """The job to keep: with ``keep_job_on_interrupt``, after a run that did not complete, the
        job (of ours: a ``job_id`` job is never deleted) holding the newest state; without a
        checkpoint there is nothing to keep."""
        if status == "completed" or not self.options.keep_job_on_interrupt:
            return None
        if self.state_job is None:
            log("fireworks: keep_job_on_interrupt: no checkpoint holds state on a trainer job, "
                "so none is kept")
            return None
        return self.state_job if self.jobs.ours(self.state_job) else None

    def resume_advice(self) -> str | None:
        """After :meth:`close`: why ``--resume`` cannot continue this run, and what is left, when
        the job holding the newest checkpoint's state was deleted; None when it can."""
        job = self.state_job
        if job is None or job not in self.jobs.gone:
            return None
        return (f"--resume cannot continue this run: its newest checkpoint's weights and optimizer "
                f"state were saved on trainer job {job}, which was deleted, and a deleted "
                "job's state is not documented as loadable by another job. What is left: "
                f"the checkpoints in {self.config.log_path} (step, data position, random state; "
                "not the weights), the logs and metrics, and the sampler weights saved on the job "
                "(weight_sync snapshots), which Fireworks keeps promotable for 30 "
                "days after a deletion. Start again, or set [fireworks] keep_job_on_interrupt = true "
                "so that a stopped run keeps its job (at a cost until the resumed run deletes it)")


@hookimpl
def register_backends(register: Any) -> None:
    register("fireworks", FireworksBackend, FireworksOptions)
