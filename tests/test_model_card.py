"""final/README.md: a Hugging Face model card of what was trained on what."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from preftune import run
from preftune.model_card import model_card


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_final_holds_a_card_of_the_data_loss_steps_and_metrics(make_config: Any) -> None:
    config = make_config(epochs=1, loss="orpo")
    summary = run(config)
    text = (Path(summary["weights"]) / "README.md").read_text()
    front = front_matter(text)
    assert front == {"base_model": "builtin:tiny", "library_name": "transformers",
                     "tags": ["preftune", "orpo", "preference-optimization"]}
    digest = hashlib.sha256(Path(config.dataset).read_bytes()).hexdigest()
    assert f"| `dataset` | `{config.dataset}` | sha256 `{digest}` |" in text
    assert "| `loss` | `orpo` |" in text and "| `orpo.lambda` |" in text
    assert f"| steps | {summary['steps']} |" in text
    for key, value in summary["final_eval"].items():
        assert f"| `{key}` | {value:.6g} |" in text


def test_a_lora_run_is_carded_as_a_peft_adapter(make_config: Any) -> None:
    summary = run(make_config(epochs=1, lora_rank=4))
    front = front_matter((Path(summary["weights"]) / "README.md").read_text())
    assert front["library_name"] == "peft" and "lora" in front["tags"]


def test_hub_data_sets_are_named_for_the_hub() -> None:
    text = model_card({"base_model": "Qwen/Qwen3-0.6B", "loss": "dpo", "beta": 0.1},
                      [("dataset", "hf:trl-lib/ultrafeedback_binarized", {"fingerprint": "abc"})],
                      steps=3, final_eval={}, adapter=False)
    assert front_matter(text)["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert "fingerprint `abc`" in text and "No held-out pairs" in text
