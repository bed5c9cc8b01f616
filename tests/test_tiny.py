"""Tests for the embedded tiny model, tokenizer and bundled demo data (preftune.tiny)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from preftune.tiny import (
    ASSETS,
    TINY,
    demo_data,
    is_builtin,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _rows(split: str) -> list[dict]:
    with open(demo_data(split), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _triples(split: str) -> list[tuple[list[dict], dict, dict]]:
    """(prompt messages, chosen assistant message, rejected assistant message)."""
    out = []
    for row in _rows(split):
        if split == "train":
            chosen, rejected = row["chosen"]["messages"], row["rejected"]["messages"]
            out.append((chosen[:-1], chosen[-1], rejected[-1]))
        else:
            out.append((row["input"]["messages"], row["preferred_output"][0], row["non_preferred_output"][0]))
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, messages: list[dict], gen: bool) -> list[int]:
    enc = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


# ---------------------------------------------------------------- names and paths
def test_is_builtin() -> None:
    assert is_builtin(TINY) and is_builtin("builtin:other")
    assert not is_builtin("Qwen/Qwen3-0.6B")
    assert not is_builtin(None) and not is_builtin("")


def test_demo_data_paths() -> None:
    for split in ("train", "heldout"):
        path = demo_data(split)
        assert isinstance(path, Path) and path.is_file() and path.parent == ASSETS
    with pytest.raises(ValueError, match="train"):
        demo_data("nope")


def test_assets_are_small() -> None:
    assert (ASSETS / "tokenizer.json").stat().st_size < 200_000


# ----------------------------------------------------------------------- tokenizer
def test_tokenizer_special_tokens_and_template(tok) -> None:
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert 256 < len(tok) <= 1024
    for special in SPECIALS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special  # special tokens are atomic
    msgs = [
        {"role": "user", "content": "The pizza was great."},
        {"role": "assistant", "content": "Glad to hear it went well!"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>user\nThe pizza was great.<|im_end|>\n"
        "<|im_start|>assistant\nGlad to hear it went well!<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level round trip


def test_tokenizer_reloads_offline_with_template(tok, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    copy = tmp_path / "tiny"
    shutil.copytree(ASSETS, copy)
    msgs = [{"role": "user", "content": "Pick the color: cat or red."}]
    want = _ids(tok, msgs, gen=True)
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        for where in (ASSETS, copy):
            again = cls.from_pretrained(str(where), local_files_only=True)
            assert again.chat_template == tok.chat_template and again.chat_template
            assert len(again) == len(tok)
            assert _ids(again, msgs, gen=True) == want
    # and it survives another save/load round trip
    tok.save_pretrained(str(tmp_path / "resaved"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "resaved"), local_files_only=True)
    assert _ids(again, msgs, gen=True) == want


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_prompt_render_is_token_prefix(tok, split: str) -> None:
    for prompt, chosen, rejected in _triples(split):
        p = _ids(tok, prompt, gen=True)
        for answer in (chosen, rejected):
            full = _ids(tok, prompt + [answer], gen=False)
            assert full[: len(p)] == p, (prompt, answer)
            assert len(full) > len(p) + 1
            assert len(full) <= 48
            assert full[-2] == tok.eos_token_id  # ... <|im_end|> \n


# ---------------------------------------------------------------------------- data
def _check_msg(msg: dict, role: str) -> None:
    assert set(msg) == {"role", "content"} and msg["role"] == role
    assert isinstance(msg["content"], str) and msg["content"].strip() == msg["content"] != ""


def test_train_format1() -> None:
    rows = _rows("train")
    assert 400 <= len(rows) <= 800
    for row in rows:
        assert set(row) == {"chosen", "rejected"}
        chosen, rejected = row["chosen"]["messages"], row["rejected"]["messages"]
        assert len(chosen) == len(rejected) == 2
        _check_msg(chosen[0], "user")
        _check_msg(chosen[1], "assistant")
        _check_msg(rejected[1], "assistant")
        assert chosen[0] == rejected[0]
        assert chosen[1]["content"] != rejected[1]["content"]


def test_heldout_format2() -> None:
    rows = _rows("heldout")
    assert 64 <= len(rows) <= 100
    for row in rows:
        assert set(row) == {"input", "preferred_output", "non_preferred_output"}
        (user,) = row["input"]["messages"]
        _check_msg(user, "user")
        (good,), (bad,) = row["preferred_output"], row["non_preferred_output"]
        _check_msg(good, "assistant")
        _check_msg(bad, "assistant")
        assert good["content"] != bad["content"]


def test_splits_disjoint_and_heldout_words_seen_in_training() -> None:
    train = [p[-1]["content"] for p, _, _ in _triples("train")]
    held = [p[-1]["content"] for p, _, _ in _triples("heldout")]
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not set(train) & set(held)
    words = {w for text in train for w in re.findall(r"[a-z]+", text.lower())}
    for text in held:
        assert set(re.findall(r"[a-z]+", text.lower())) <= words, text


def test_preference_not_learnable_from_length_or_reply_alone(tok) -> None:
    triples = _triples("train")
    diffs = [len(tok(c["content"])["input_ids"]) - len(tok(r["content"])["input_ids"]) for _, c, r in triples]
    assert abs(sum(diffs) / len(diffs)) < 1.0
    # every preferred reply is also dispreferred somewhere: the prompt must be read
    chosen = {c["content"] for _, c, _ in triples}
    rejected = {r["content"] for _, _, r in triples}
    assert len(chosen & rejected) >= 0.5 * len(chosen)


# --------------------------------------------------------------------------- model
def test_tiny_config_matches_tokenizer(tok) -> None:
    cfg = tiny_config()
    assert cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert cfg.bos_token_id is not None
    assert cfg.tie_word_embeddings and cfg.num_hidden_layers == 2
    assert cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size


def test_tiny_model_deterministic_and_rng_untouched(tok) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = tiny_model(), tiny_model()
    assert torch.equal(state, torch.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = tiny_model(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert a.get_input_embeddings().weight.shape[0] == len(tok)
    assert a.get_output_embeddings().weight.shape[0] == len(tok)
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


def test_tiny_model_forward_backward(tok) -> None:
    model = tiny_model()
    msgs = [
        {"role": "user", "content": "The soup was bland."},
        {"role": "assistant", "content": "Sorry to hear it went badly."},
    ]
    ids = torch.tensor([_ids(tok, msgs, gen=False)])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_build_tool_reproduces_the_shipped_assets(tmp_path) -> None:
    """The shipped tokenizer and data are exactly what tools/build_tiny_assets.py builds."""
    import subprocess
    import sys

    from preftune.tiny import ASSETS

    tool = Path(__file__).resolve().parents[1] / "tools" / "build_tiny_assets.py"
    subprocess.run([sys.executable, str(tool), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
