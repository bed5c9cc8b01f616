"""What the model now says: at each evaluation, with ``eval_samples = N``, the policy's greedy
completions of the first N held-out prompts, beside each pair's chosen completion. The backend
generates (its optional ``sample`` verb, :class:`preftune.SamplingBackend`); the sinks show the
rows (``samples.jsonl``, ``report.html``, a W&B table) through ``preftune_log_samples``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .messages import log
from .types import TokenizedPair
from .world import World

if TYPE_CHECKING:
    from .config import Config
    from .loop import Data

TABLE_COLUMNS = ("step", "source", "prompt", "completion", "chosen")  # a tracker's table of samples


def sample_table(samples: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The columns and rows of a tracker's table of ``samples`` (W&B, MLflow)."""
    return list(TABLE_COLUMNS), [[row.get(c) for c in TABLE_COLUMNS] for row in samples]


def sampled_pairs(config: Config, backend: Any, data: Data, backend_name: str) -> list[int]:
    """The held-out pairs whose prompts are sampled at each evaluation; none (said once) when
    ``eval_samples`` is off, there is nothing held out, or the backend cannot generate."""
    if not config.eval_samples:
        return []
    if not callable(getattr(backend, "sample", None)):
        log(f"eval_samples: the {backend_name!r} backend cannot generate text (it has no sample "
            "verb); training on without samples")
        return []
    if len(data.eval) < config.eval_samples:
        log(f"eval_samples = {config.eval_samples}, but there are {len(data.eval)} held-out pairs: "
            f"sampling {len(data.eval)}" + (" (none: set eval_fraction or eval_dataset)"
                                           if not data.eval else ""))
    return data.eval[:config.eval_samples]


def stop_tokens(tokenizer: Any, pairs: Sequence[TokenizedPair]) -> list[int]:
    """Where a completion ends: the tokenizer's end-of-sequence token, and the special token the
    chosen completions end with (a chat template's end of turn, such as ``<|im_end|>``)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops += [p.chosen[-1] for p in pairs if p.chosen and p.chosen[-1] in special]
    return sorted(set(stops))


def eval_samples(backend: Any, tokenizer: Any, data: Data, index: list[int], config: Config,
                 step: int, world: World | None = None) -> list[dict[str, Any]]:
    """Greedy completions of the prompts of pairs ``index`` by the policy as it is now, as rows
    for ``preftune_log_samples``. Under several processes every rank generates (a sharded model
    needs them all), and the rows are the main rank's."""
    world = world or World()
    pairs = [data.pairs[i] for i in index]
    stop = stop_tokens(tokenizer, pairs)
    with world.collective("generating eval samples"):
        completions = backend.sample([list(p.prompt) for p in pairs], config.eval_sample_tokens, stop)

    def text(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    return [{"step": step, "index": i, "source": str(p.source) if p.source else None,
             "prompt": text(p.prompt), "completion": text(tokens), "chosen": text(p.chosen),
             "new_tokens": len(tokens), "stopped": bool(tokens) and tokens[-1] in stop}
            for i, p, tokens in zip(index, pairs, completions)]
