"""The IPO example plugin, installed: found by entry point, correct, and trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from preftune_ipo import IPOLoss, IPOOptions

from preftune import Config, PairLogps, get_registry, run


def test_ipo_is_registered_from_its_distribution() -> None:
    component = get_registry().get("loss", "ipo")
    assert (component.distribution, component.plugin) == ("preftune-ipo", "ipo")


def test_ipo_matches_the_formula() -> None:
    counts = torch.tensor([2.0]), torch.tensor([1.0])
    policy = PairLogps(torch.tensor([-3.0]), torch.tensor([-3.0]), *counts)
    ref = PairLogps(torch.tensor([-4.0]), torch.tensor([-2.0]), *counts)
    loss, metrics = IPOLoss(IPOOptions(tau=0.25))(policy, ref)
    margin = (-3.0 - -4.0) - (-3.0 - -2.0)  # = 2
    assert math.isclose(float(metrics["margin"]), margin)
    assert math.isclose(float(loss), (margin - 1 / (2 * 0.25)) ** 2)  # = 0 at the target
    _, normalized = IPOLoss(IPOOptions(tau=0.25, normalize=True))(policy, ref)
    assert math.isclose(float(normalized["margin"]), (-1.5 - -2.0) - (-3.0 - -2.0))


def test_a_run_with_the_ipo_loss_trains(tmp_path: Path) -> None:
    words = ["tea", "rain", "jazz", "maps", "soup", "cats", "snow", "gold"]
    user = "Tell me about {} number {}."
    records = [{"input": user.format(w, i), "preferred_output": f"Sure, {w} is fine.",
                "non_preferred_output": f"No, {w} is wrong."} for i, w in enumerate(words * 3)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = Config(base_model="builtin:tiny", dataset=str(data), loss="ipo", eval_fraction=0.25,
                    epochs=4, batch_size=4, learning_rate=2e-3, max_seq_len=64,
                    log_path=str(tmp_path / "logs"), cache_dir=str(tmp_path / "cache"),
                    sinks=["jsonl"], ipo={"tau": 0.5})
    summary = run(config)
    assert summary["status"] == "completed"
    assert summary["final_eval"]["eval_margin"] > 0.5 and summary["final_eval"]["eval_accuracy"] >= 0.8
    saved = json.loads((tmp_path / "logs" / "config.json").read_text())
    assert saved["ipo"] == {"tau": 0.5, "normalize": False}
