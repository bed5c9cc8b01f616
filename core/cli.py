"""The ``preftune`` command: run, demo, plugins, validate, report, export."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import PreftuneError, Problem
from .messages import processes, quiet, tag
from .secrets import mask_secrets

app = typer.Typer(
    help="Preference optimization (DPO, ORPO, plugin losses) for language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .manager import preftune_version

        typer.echo(f"preftune {preftune_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print preftune's version and exit.")] = False,
) -> None:
    """Preference optimization (DPO, ORPO, plugin losses) for language models."""

# The demo's settings: tuned so the tiny model reaches >= 0.9 held-out accuracy in under 30 s
# on two CPU cores.
DEMO_SETTINGS: dict[str, Any] = {
    "base_model": "builtin:tiny",
    "beta": 0.1,
    "epochs": 6,
    "batch_size": 16,
    "learning_rate": 2e-3,
    "lr_schedule": "linear",
    "warmup_steps": 30,
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "max_seq_len": 128,
    "eval_interval": 20,
    "console": {"interval": 20},
}


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`PreftuneError`, or the machine's refusal (an ``OSError``: a full disk, no
    permission, the network down), as one clear message and exit with status 2. Whatever looks
    like a secret in it is masked, whoever wrote the message."""
    from .signals import Stopped

    try:
        yield
    except Stopped:
        raise  # not an error: the command that ran says how to go on
    except PreftuneError as exc:
        typer.echo(f"error: {mask_secrets(tag(str(exc)))}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(mask_secrets(f"error: {tag(where + str(exc.strerror or exc))}"), err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # before training starts, or a second Ctrl-C: nothing to resume
        typer.echo("interrupted (Ctrl-C); nothing was trained past the last checkpoint", err=True)
        raise typer.Exit(130) from None


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: key=value or table.key=value."),
]


def settings_help() -> str:
    """Every top-level setting, for ``preftune run --help``."""
    from .config import Config

    return ("Settings (keys of the config file; --set key=value overrides one): "
            + ", ".join(Config.model_fields) + ". Plugin options go in a table named after the "
            "plugin, e.g. the local backend's precision (--set local.precision=bf16-mixed). docs/config.md "
            "describes every key; preftune plugins lists what is installed.")


@app.command(epilog=settings_help())
def run(
    config: Annotated[Path, typer.Argument(help="Config file (.toml, .yaml, .yml or .json).")],
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in log_path.")
    ] = False,
) -> None:
    """Train with a config file. SIGTERM or Ctrl-C stop it after the current step (with a
    checkpoint when checkpointing is on) and print the command that resumes it."""
    from .config import load_config, masked_set
    from .loop import run as run_training
    from .signals import Stopped

    try:
        with user_errors():
            config_ = load_config(config, (set_ or []) + (["resume=true"] if resume else []))
            summary = run_training(config_)
    except Stopped as stopped:
        shown = [masked_set(s) for s in set_ or []]  # a secret is not repeated: type it again
        sets = " ".join(f"--set {shlex.quote(s)}" for s in shown)
        command = " ".join(["preftune run", shlex.quote(str(config)), sets, "--resume"]).replace("  ", " ")
        if quiet():  # the main rank says it
            raise typer.Exit(stopped.exit_code) from None
        typer.echo(f"{stopped}", err=True)
        if stopped.checkpoint is not None and stopped.advice:  # the backend deleted what it needs
            typer.echo(f"no resume: {stopped.advice}", err=True)
        elif stopped.checkpoint is not None:
            masked = " (*** stands for a secret you gave: give it again)" if shown != (set_ or []) else ""
            args = command.removeprefix("preftune ")
            launcher = (f" (under torchrun: torchrun ... -m preftune {args}, on any number of "
                        "processes)") if processes() > 1 else ""
            typer.echo(f"resume with: {command}{masked}{launcher}", err=True)
        raise typer.Exit(stopped.exit_code) from None
    if not quiet():  # one summary, the main rank's
        typer.echo(json.dumps(summary, indent=2))
    if summary.get("errors"):  # after training, with the weights saved (a promote that failed)
        for error in summary["errors"] if not quiet() else []:
            typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1)


@app.command()
def demo(
    log_path: Annotated[Path, typer.Option(help="Where to write the demo's logs.")] = Path(
        "preftune_demo"
    ),
    set_: SetOption = None,
) -> None:
    """Train DPO on the embedded tiny model and bundled data, offline, on CPU in under 30 seconds."""
    from .config import apply_overrides, make_config
    from .loop import run as run_training
    from .report import write_report
    from .tiny import demo_data

    data = {**DEMO_SETTINGS, "log_path": str(log_path), "dataset": str(demo_data("train")),
            "eval_dataset": str(demo_data("heldout")), "cache_dir": str(log_path / "cache")}
    with user_errors():
        summary = run_training(make_config(apply_overrides(data, set_ or []), "demo", set_ or []))
    before, after = summary["initial_eval"], summary["final_eval"]
    typer.echo("held-out preference pairs, before -> after DPO:")
    for key in ("eval_accuracy", "eval_margin", "eval_loss"):
        typer.echo(f"  {key[5:]:<10} {before[key]:8.3f} -> {after[key]:8.3f}")
    typer.echo(f"weights: {summary['weights']}   metrics: {log_path / 'metrics.jsonl'}")
    with user_errors():
        typer.echo(f"report: {write_report([log_path])}")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List installed components: name, kind, plugin module, distribution and version."""
    from .manager import get_registry

    with user_errors():
        registry = get_registry()
    rows = [{"name": c.name, "kind": c.kind, "plugin": c.plugin, "distribution": c.distribution,
             "version": c.version} for c in registry.all()]
    broken = [vars(b) for b in registry.pm.broken]
    if as_json:
        typer.echo(json.dumps({"components": rows, "broken": broken}, indent=2))
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    typer.echo("  ".join(k.upper().ljust(w) for k, w in widths.items()))
    for row in rows:
        typer.echo("  ".join(row[k].ljust(w) for k, w in widths.items()))
    for b in broken:
        typer.echo(f"BROKEN plugin {b['name']} ({b['distribution']}): {b['error']}", err=True)


@app.command()
def validate(
    data: Annotated[str | None, typer.Argument(
        help="A data set: a JSONL, JSON or Parquet file, a directory, or hf:org/name.")] = None,
    format: Annotated[str, typer.Option(help="Dataset format; auto picks per record.")] = "auto",
    tokenizer: Annotated[
        str | None, typer.Option(help="Also tokenize with this tokenizer (id, path, builtin:tiny).")
    ] = None,
    max_seq_len: Annotated[int | None, typer.Option(
        min=2, help="With --tokenizer: the length limit (default as run's: 4096, or the model's "
        "context when --tokenizer names a model with a shorter one).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Check a run's data as that run would read it: its data sets, format, "
        "tokenizer, max_seq_len and template_ignores.")] = None,
) -> None:
    """Check every record of a data set as run reads it; print each bad one with its reason.
    Exit 1 if any."""
    from .data import make_format
    from .data.pipeline import prepare
    from .errors import DataError
    from .hub import load_tokenizer
    from .manager import get_registry

    notes: list[str] = []
    with user_errors():
        registry = get_registry()
        settings, name = validate_settings(data, format, tokenizer, max_seq_len, config)
        tokenizing = bool(tokenizer or config)
        try:
            built = prepare(registry, settings, make_format(registry, settings),
                            load_tokenizer(name) if tokenizing else None, lambda _: None, progress=False)
            problems, records = built.problems, built.records
            notes = built.report.lines(settings.max_seq_len) if tokenizing else []
            if tokenizing and not built.pairs:  # as run refuses it
                problems = problems + [Problem(settings.dataset, "", f"no pair fits max_seq_len="
                                               f"{settings.max_seq_len}: every prompt alone is at "
                                               "least that long")]
        except DataError as exc:  # the data set as a whole (it holds no pairs)
            problems, records = exc.problems, 0
    for problem in problems:
        typer.echo(str(problem))
    for note in notes:
        typer.echo(f"note: {note}")
    bad = len({str(p.where) for p in problems if hasattr(p.where, "sep")})
    names = " and ".join(n for n in (settings.dataset, settings.eval_dataset) if n)
    typer.echo(f"{names}: {records} records, {records - bad} ok, {bad} bad")
    if problems:
        raise typer.Exit(1)


def validate_settings(data: str | None, format: str, tokenizer: str | None, max_seq_len: int | None,
                      config: Path | None) -> tuple[Any, str]:
    """The settings ``validate`` reads with (every bad record listed, none stopping it), and the
    tokenizer's name: from a run's config file, or from the command line."""
    from .config import load_config, make_config
    from .errors import ConfigError

    listing = {"on_bad_record": "skip", "max_bad_fraction": 1.0}
    if config is not None:
        if data is not None:
            raise ConfigError("validate: give a data set or --config, not both")
        run = load_config(config)
        name = run.tokenizer_model or run.base_model
        if "max_seq_len" not in run.model_fields_set:  # as run lowers it to the model's context
            listing["max_seq_len"] = default_max_seq_len(name)
        return run.model_copy(update=listing), name
    if data is None:
        raise ConfigError("validate: give a data set (a file, a directory or hf:org/name) or --config")
    settings: dict[str, Any] = {"base_model": tokenizer or "builtin:tiny", "dataset": data,
                                "format": format, **listing}
    if tokenizer:
        settings["max_seq_len"] = max_seq_len or default_max_seq_len(tokenizer)
    return make_config(settings, "validate"), tokenizer or "builtin:tiny"


def default_max_seq_len(name: str) -> int:
    """``run``'s default: 4096, lowered to the context of the model called ``name`` if any."""
    from .config import Config
    from .errors import ConfigError
    from .weights import load_model_config, model_context

    default = int(Config.model_fields["max_seq_len"].default)
    try:
        context = model_context(load_model_config(name))
    except ConfigError:  # a tokenizer that is not also a model
        return default
    return min(default, context[1]) if context else default


@app.command()
def report(
    log_paths: Annotated[list[Path], typer.Argument(help="One run's log_path, or several to compare.")],
    out: Annotated[Path | None, typer.Option(help="Output directory; default the first log_path.")] = None,
) -> None:
    """Plot loss, margin, accuracy, rewards and held-out accuracy; write report.html."""
    from .report import format_table, load_run, summary_table, write_report

    with user_errors():
        path = write_report(log_paths, out)
        typer.echo(format_table(summary_table([load_run(p) for p in log_paths])))
    typer.echo(f"report: {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's log_path.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (must not exist, or be empty).")],
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge the LoRA adapter into its base model.")
    ] = False,
) -> None:
    """Write a finished LoRA run's adapter merged into its base model as a plain Hugging Face
    model directory (config, safetensors, tokenizer, chat template)."""
    from .export import export_run
    from .manager import get_registry

    if not merge:  # the one export there is: final/ itself already is the adapter
        typer.echo("error: export needs --merge (final/ itself is the adapter, to copy as it is)", err=True)
        raise typer.Exit(2)
    with user_errors():
        typer.echo(f"merged model: {export_run(run_dir, out, get_registry())}")


def main() -> None:
    """Console-script entry point."""
    import os
    import sys

    if not sys.stderr.isatty():  # no progress-bar redraws (\r, escapes) from libraries in a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    main()
