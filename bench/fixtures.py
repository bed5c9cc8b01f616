"""Benchmark fixtures: a model directory (random weights, built from a config) and preference pairs.

Everything is made offline and deterministically (seeded) under ``bench/.fixtures/<name>-<hash>/``:
``model/`` holds the weights and preftune's shipped tiny tokenizer (every contender loads both from
there), ``pairs.jsonl`` the pairs in preftune's Format 1 (``{"chosen": {"messages": [...]},
"rejected": {"messages": [...]}}``), ``fixture.json`` the spec and token statistics. A directory
that is complete is reused. Importing this module does not import torch; building runs in a
subprocess (``python bench/fixtures.py build SPEC_JSON``) so the benchmark's parent stays small.

Text is random single-token words from the tokenizer's vocabulary, so token counts are controlled.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent / ".fixtures"
VERSION = 1  # bump when the way fixtures are built changes: old directories are then not reused


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only model built from a transformers config with random weights."""

    arch: str  # "qwen3" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class FixtureSpec:
    """A model, a number of pairs, the batch size and the word counts of prompts and completions."""

    name: str
    model: ModelSpec
    pairs: int
    batch: int
    prompt_words: tuple[int, int]  # inclusive range, drawn per pair
    completion_words: tuple[int, int]  # drawn per completion (chosen and rejected separately)
    seed: int = 0
    max_seq_len: int = 0  # preftune's max_seq_len; 0 = the longest sequence + 64 (nothing truncated)
    note: str = ""

    def key(self) -> str:
        """Short hash of everything that shapes the files (not the note)."""
        spec = {k: v for k, v in asdict(self).items() if k != "note"} | {"version": VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Fixture:
    """A built fixture: where its files are, and token statistics of its pairs."""

    spec: FixtureSpec
    dir: Path
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def pairs_file(self) -> Path:
        return self.dir / "pairs.jsonl"


TINY_QWEN3 = ModelSpec("qwen3", vocab_size=4096, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
SMOLLM2_135M = ModelSpec("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=2048)

FIXTURES: dict[str, FixtureSpec] = {
    "balanced": FixtureSpec("balanced", TINY_QWEN3, pairs=64, batch=8, prompt_words=(110, 180),
                            completion_words=(110, 180), note="prompt ~ completion, ~300-token sequences"),
    "prompt_heavy": FixtureSpec("prompt_heavy", TINY_QWEN3, pairs=64, batch=8, prompt_words=(320, 480),
                                completion_words=(80, 120), note="prompt ~4x the completion"),
    "real_vocab": FixtureSpec("real_vocab", SMOLLM2_135M, pairs=16, batch=4, prompt_words=(110, 180),
                              completion_words=(110, 180), note="SmolLM2-135M shape, vocab 49152"),
}

SCALING_LENGTHS = (256, 512, 1024, 2048)
SCALING_TOKENS_PER_STEP = 4096  # constant across lengths: a linear cost keeps tokens/s and RSS flat


def scaling_spec(length: int, steps: int = 4) -> FixtureSpec:
    """Balanced model, every sequence just under ``length`` tokens, the same tokens per step at
    every length (batch = 4096 / (2 * length) pairs) and ``steps`` steps."""
    batch = max(1, SCALING_TOKENS_PER_STEP // (2 * length))
    half = length // 2 - 8  # the chat template adds ~14 tokens around prompt and completion
    return FixtureSpec(f"scale-{length}", TINY_QWEN3, pairs=batch * steps, batch=batch,
                       prompt_words=(half, half), completion_words=(half, half), max_seq_len=length,
                       note=f"sequences filling max_seq_len {length}")


def smoke_spec(spec: FixtureSpec) -> FixtureSpec:
    """A cheaper variant for development: at most 2 layers."""
    layers = min(spec.model.num_hidden_layers, 2)
    model = ModelSpec(**{**asdict(spec.model), "num_hidden_layers": layers})
    return FixtureSpec(**{**asdict(spec), "model": model, "name": spec.name + "-smoke",
                          "prompt_words": tuple(spec.prompt_words),
                          "completion_words": tuple(spec.completion_words)})


def ensure(spec: FixtureSpec) -> Fixture:
    """The fixture of ``spec``, built first (in a subprocess) unless already complete."""
    directory = ROOT / f"{spec.name}-{spec.key()}"
    info = directory / "fixture.json"
    if not info.exists():
        payload = json.dumps({"spec": asdict(spec), "dir": str(directory)})
        subprocess.run([sys.executable, __file__, "build", payload], check=True)
    return Fixture(spec, directory, json.loads(info.read_text())["stats"])


# ---- building (runs in the subprocess; imports torch and transformers) ----


def load_tokenizer() -> Any:
    """preftune's shipped tiny tokenizer (ChatML template, byte-level BPE)."""
    from preftune.tiny import tiny_tokenizer

    return tiny_tokenizer()


def word_pool(tokenizer: Any) -> list[str]:
    """Words that are one token each when preceded by a space."""
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def build_model(spec: ModelSpec, tokenizer: Any, out: Path, seed: int) -> None:
    """Random-init model in float32, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {spec.vocab_size} < tokenizer size {len(tokenizer)}")
    kwargs = {k: v for k, v in asdict(spec).items() if k != "arch"}
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.pad_token_id}
    config_class = Qwen3Config if spec.arch == "qwen3" else LlamaConfig
    config = config_class(**kwargs, **ids, attention_dropout=0.0, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(out)
    tokenizer.model_max_length = spec.max_position_embeddings  # the shipped tokenizer says 256
    tokenizer.save_pretrained(out)


def make_pair(rng: random.Random, pool: list[str], spec: FixtureSpec) -> dict[str, Any]:
    """One Format 1 record: a user prompt and two different assistant replies."""

    def text(bounds: tuple[int, int]) -> str:
        return " ".join(rng.choice(pool) for _ in range(rng.randint(*bounds)))

    prompt = {"role": "user", "content": text(spec.prompt_words)}
    chosen, rejected = text(spec.completion_words), text(spec.completion_words)
    while rejected == chosen:
        rejected = text(spec.completion_words)
    return {"chosen": {"messages": [prompt, {"role": "assistant", "content": chosen}]},
            "rejected": {"messages": [prompt, {"role": "assistant", "content": rejected}]}}


def token_stats(tokenizer: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rendered token counts: prompt, completions, sequences, and the training tokens of all pairs."""
    prompts, completions, sequences = [], [], []
    for record in records:
        prompt = record["chosen"]["messages"][:-1]
        n_prompt = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        prompts.append(n_prompt)
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(record[side]["messages"], tokenize=True, return_dict=True)
            sequences.append(len(full["input_ids"]))
            completions.append(sequences[-1] - n_prompt)
    return {"pairs": len(records), "prompt_tokens_mean": sum(prompts) / len(prompts),
            "completion_tokens_mean": sum(completions) / len(completions),
            "sequence_tokens_mean": sum(sequences) / len(sequences),
            "sequence_tokens_max": max(sequences), "training_tokens": sum(sequences),
            "pair_tokens": [sequences[2 * i] + sequences[2 * i + 1] for i in range(len(records))]}


def build(spec: FixtureSpec, directory: Path) -> None:
    """Write the model directory, the pairs and ``fixture.json`` (last: it marks completion)."""
    tokenizer = load_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    build_model(spec.model, tokenizer, directory / "model", spec.seed)
    rng, pool = random.Random(spec.seed), word_pool(tokenizer)
    records = [make_pair(rng, pool, spec) for _ in range(spec.pairs)]
    with open(directory / "pairs.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    stats = token_stats(tokenizer, records)
    if spec.max_seq_len and stats["sequence_tokens_max"] > spec.max_seq_len:
        raise ValueError(f"{spec.name}: a sequence has {stats['sequence_tokens_max']} tokens "
                         f"> max_seq_len {spec.max_seq_len}")
    info = {"spec": asdict(spec), "stats": stats}
    (directory / "fixture.json").write_text(json.dumps(info, indent=2))


def spec_from_dict(data: dict[str, Any]) -> FixtureSpec:
    words = {k: tuple(data[k]) for k in ("prompt_words", "completion_words")}
    return FixtureSpec(**{**data, **words, "model": ModelSpec(**data["model"])})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: python bench/fixtures.py build SPEC_JSON  (compare_trl.py calls this)")
    payload = json.loads(sys.argv[2])
    build(spec_from_dict(payload["spec"]), Path(payload["dir"]))
