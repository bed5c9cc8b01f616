"""Tables of the benchmark's results: min and median per contender, each run, and the scaling view."""

from __future__ import annotations

import math
import statistics
from typing import Any

from fixtures import Fixture

LN2 = math.log(2)
BUSY_LOAD = 0.5  # a run that starts above this 1-minute load average is flagged as invalid

# (column title, result key, scale, format)
METRICS = [("wall s", "wall_s", 1.0, "{:.1f}"), ("train tok/s", "tokens_per_s", 1.0, "{:.0f}"),
           ("ref pass s", "ref_s", 1.0, "{:.2f}"), ("peak RSS MiB", "peak_rss_bytes", 2**-20, "{:.0f}"),
           ("step-0 loss", "loss0", 1.0, "{:.4f}"), ("final loss", "loss_final", 1.0, "{:.4f}")]


def with_losses(run: dict[str, Any]) -> dict[str, Any]:
    losses = run.get("losses") or []
    return {**run, "loss0": losses[0] if losses else None, "loss_final": losses[-1] if losses else None}


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per contender: min and median of each metric over its successful runs."""
    out = {}
    for name in names:
        ok = [with_losses(r) for r in runs if r["contender"] == name and r["rc"] == 0]
        row: dict[str, Any] = {"runs": len(ok), "failed": sum(r["contender"] == name for r in runs) - len(ok),
                               "busy_runs": sum(r["load_start"] > BUSY_LOAD for r in ok),
                               "problems": sorted({p for r in ok for p in r.get("problems", [])})}
        for _, key, scale, _ in METRICS:
            values = [r[key] * scale for r in ok if r.get(key) is not None]
            row[key] = {"min": min(values), "median": statistics.median(values)} if values else None
        row["step0_is_ln2"] = bool(ok) and all(r["loss0"] is not None and abs(r["loss0"] - LN2) < 1e-3
                                               for r in ok)
        out[name] = row
    return out


def align(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per contender, ``min / median`` in each cell."""
    rows = [["min / median", *[m[0] for m in METRICS], "ln 2 at 0", "runs"]]
    for name, row in summary.items():
        cells = [name]
        for _, key, _, fmt in METRICS:
            stat = row[key]
            cells.append(f"{fmt.format(stat['min'])} / {fmt.format(stat['median'])}" if stat else "-")
        runs = f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        runs += f" ({row['busy_runs']} busy)" if row["busy_runs"] else ""
        rows.append(cells + ["yes" if row["step0_is_ln2"] else "NO", runs])
    problems = [f"{name}: {', '.join(row['problems'])}" for name, row in summary.items() if row["problems"]]
    return align(rows) + "".join(f"\nPROBLEM {p}" for p in problems)


def run_lines(runs: list[dict[str, Any]]) -> str:
    """Each run in the order it ran: wall time, threads, load average at its start and end."""
    rows = [["run", "wall s", "threads", "load start", "load end", "busy cores before", "waited s"]]
    for r in runs:
        wall = f"{r['wall_s']:.1f}" if r["rc"] == 0 else f"FAILED rc={r['rc']}"
        rows.append([f"round {r['round'] + 1} {r['contender']}", wall, str(r.get("torch_threads")),
                     f"{r['load_start']:.2f}", f"{r['load_end']:.2f}", f"{r['busy_cores_before']:.2f}",
                     f"{r.get('settle_s', 0):.0f}"])
    return align(rows)


def describe(fixture: Fixture, runs: list[dict[str, Any]]) -> str:
    """One line: the model, batch, steps and token counts of a fixture."""
    s, stats, m = fixture.spec, fixture.stats, fixture.spec.model
    steps = max((r.get("steps") or 0) for r in runs) if runs else 0
    return (f"== {s.name}: {m.arch} {m.num_hidden_layers} layers, hidden {m.hidden_size}, vocab "
            f"{m.vocab_size}; batch {s.batch}, {steps} steps; prompt ~{stats['prompt_tokens_mean']:.0f} "
            f"tokens, completion ~{stats['completion_tokens_mean']:.0f}, sequences up to "
            f"{stats['sequence_tokens_max']} ({s.note})")


def scaling_table(results: dict[str, Any], names: list[str]) -> str:
    """Median tokens/s (and its ratio to the shortest length) and peak RSS per max_seq_len."""
    rows = [["max_seq_len", *[f"{n} {col}" for n in names for col in ("tok/s", "vs first", "RSS MiB")]]]
    base: dict[str, float] = {}
    for fixture_name, entry in results.items():
        cells = [fixture_name.split("-")[1]]
        for n in names:
            tps, rss = entry["summary"][n]["tokens_per_s"], entry["summary"][n]["peak_rss_bytes"]
            if tps is None or rss is None:
                cells += ["-", "-", "-"]
                continue
            base.setdefault(n, tps["median"])
            cells += [f"{tps['median']:.0f}", f"{tps['median'] / base[n]:.2f}x", f"{rss['median']:.0f}"]
        rows.append(cells)
    return align(rows)
