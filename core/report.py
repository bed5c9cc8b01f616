"""``preftune report``: plots of a run's metrics (or several runs overlaid), a self-contained
HTML page (with the eval samples, when the run generated them), and a summary table. Reads only
what the ``jsonl`` sink wrote."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PreftuneError

# (file stem, title, [(source, metric key, label suffix)]) ; source is "train" or "eval"
PLOTS = [
    ("loss", "Loss", [("train", "loss", ""), ("eval", "eval_loss", " (held-out)")]),
    ("margin", "Margin (log-ratio)", [("train", "margin", ""), ("eval", "eval_margin", " (held-out)")]),
    ("accuracy", "Preference accuracy", [("train", "accuracy", "")]),
    ("rewards", "Rewards (beta x log-ratio)",
     [("train", "chosen_reward", " chosen"), ("train", "rejected_reward", " rejected")]),
    ("eval_accuracy", "Held-out preference accuracy", [("eval", "eval_accuracy", "")]),
    ("log_odds_ratio", "Log odds ratio (ORPO)",
     [("train", "log_odds_ratio", ""), ("eval", "eval_log_odds_ratio", " (held-out)")]),
]
SUMMARY_COLUMNS = ["run", "steps", "loss", "eval_loss", "eval_accuracy", "eval_margin",
                   "tokens_per_s"]
SAMPLE_STEPS = 4  # evaluations whose samples the page shows side by side: the first, the last between


@dataclass
class Run:
    name: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    config: dict[str, Any]
    samples: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        last_train = self.train[-1] if self.train else {}
        last_eval = self.eval[-1] if self.eval else {}
        return {"run": self.name, "steps": last_train.get("step", 0), **{
            k: last_train.get(k, last_eval.get(k)) for k in SUMMARY_COLUMNS[2:]}}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file; a line that is not one (cut short by a killed run,
    or damaged) is skipped."""
    rows = []
    if path.exists():
        for line in read_text(path).splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise PreftuneError(f"cannot read {path}: {exc.strerror}") from None


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        problem = "is a file, not a run's log_path" if path.exists() else "no such directory"
        raise PreftuneError(f"{path}: {problem} ({path.absolute()})")
    train, evals = read_rows(path / "metrics.jsonl"), read_rows(path / "eval.jsonl")
    if not train and not evals:
        raise PreftuneError(f"{path}: no metrics.jsonl or eval.jsonl (was the jsonl sink on?)")
    config_file = path / "config.json"
    try:
        config = json.loads(read_text(config_file)) if config_file.exists() else {}
    except ValueError:
        config = {}  # damaged: the report goes on without the run's settings
    config = config if isinstance(config, dict) else {}
    return Run(path.resolve().name, path, train, evals, config, read_rows(path / "samples.jsonl"))


def plot(runs: list[Run], stem: str, title: str, series: list[tuple[str, str, str]],
         out_dir: Path) -> Path | None:
    """One PNG with every run's curves for ``series``; None when no run has those metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    drew = False
    for run in runs:
        for source, key, suffix in series:
            rows = [r for r in (run.train if source == "train" else run.eval) if key in r]
            if not rows:
                continue
            label = (run.name if len(runs) > 1 else key) + (suffix if len(runs) > 1 else "")
            style = {"marker": "o", "markersize": 3} if source == "eval" else {}
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label, **style)
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    target = out_dir / f"{stem}.png"
    fig.savefig(target)
    plt.close(fig)
    return target


def shown_steps(steps: list[int], count: int = SAMPLE_STEPS) -> list[int]:
    """``count`` of ``steps`` spread evenly, the first and the last always among them."""
    if len(steps) <= count:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)})


def samples_html(run: Run) -> list[str]:
    """The run's eval samples as a table: one row per held-out prompt, its chosen completion,
    then what the policy generated at a few evaluations (the first and the last included)."""
    steps = shown_steps(sorted({r["step"] for r in run.samples if isinstance(r.get("step"), int)}))
    by_prompt: dict[Any, dict[int, dict[str, Any]]] = {}
    for row in run.samples:
        if row.get("step") in steps:
            by_prompt.setdefault(row.get("index"), {})[row["step"]] = row
    if not by_prompt:
        return []
    head = ["prompt", "chosen"] + [f"step {s}" for s in steps]
    page = [f"<h2>Samples: {html.escape(run.name)}</h2><table class='samples'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for rows in by_prompt.values():
        any_row = next(iter(rows.values()))
        cells = [any_row.get("prompt"), any_row.get("chosen")]
        cells += [rows[s].get("completion") if s in rows else None for s in steps]
        page.append("<tr>" + "".join(f"<td>{html.escape(str(c) if c is not None else '-')}</td>"
                                     for c in cells) + "</tr>")
    page.append("</table>")
    return page


def summary_table(runs: list[Run]) -> list[list[str]]:
    rows = [SUMMARY_COLUMNS]
    for run in runs:
        values = run.summary()
        rows.append([_cell(values[c]) for c in SUMMARY_COLUMNS])
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def write_report(log_paths: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out_dir`` (default: the first run's log_path)."""
    runs = [load_run(p) for p in log_paths]
    out = Path(out_dir) if out_dir else runs[0].path
    out.mkdir(parents=True, exist_ok=True)
    images = [(title, p) for stem, title, series in PLOTS
              if (p := plot(runs, stem, title, series, out)) is not None]
    table = summary_table(runs)
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>preftune report</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            ".samples td{text-align:left;white-space:pre-wrap;vertical-align:top;max-width:30em}"
            "</style></head><body>",
            f"<h1>preftune report: {html.escape(', '.join(r.name for r in runs))}</h1>",
            "<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table[0]) + "</tr>"]
    page += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:]]
    page.append("</table>")
    for title, image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        page.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{data}'>")
    for run in runs:
        page += samples_html(run)
    for run in runs:
        page.append(f"<h2>Config: {html.escape(run.name)}</h2><pre>"
                    f"{html.escape(json.dumps(run.config, indent=2))}</pre>")
    page.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(page))
    return report
