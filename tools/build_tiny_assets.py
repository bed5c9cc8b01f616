#!/usr/bin/env python
"""Regenerate the embedded tiny assets under ``core/assets/tiny/``.

Produces, deterministically (fixed seeds, no network):

* a byte-level BPE tokenizer (``tokenizer.json`` + config + ChatML chat template),
  trained in-process with ``tokenizers`` on the demo corpus plus generic English;
* ``train.jsonl``   -- preference pairs in Fireworks DPO "Format 1"
  (``{"chosen": {"messages": [...]}, "rejected": {"messages": [...]}}``);
* ``heldout.jsonl`` -- disjoint pairs in "Format 2"
  (``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``).

The synthetic preference is prompt-dependent but simple, so a randomly initialised
two-layer transformer learns it with a few hundred DPO steps on CPU:

* ``sentiment``: a short review with one positive or negative word; the preferred
  reply is the reaction matching the sentiment, the other is the opposite reaction
  (same reply pools on both sides, so replies alone carry no signal).
* ``category``: "which one is a <category>: <a> or <b>?"; the preferred reply names
  the word of the asked category (every word is preferred in some pairs and
  rejected in others, so the question must be read).

Held-out prompts use templates and (template, word) combinations that never occur
in training, built only from words the model saw in training.

Usage: ``python tools/build_tiny_assets.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 640
N_TRAIN = 800
N_HELDOUT = 96
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "core" / "assets" / "tiny"

# --------------------------------------------------------------------------- vocabulary
POSITIVE = (
    "great lovely excellent wonderful delicious amazing superb fantastic pleasant perfect brilliant charming"
).split()
NEGATIVE = (
    "awful terrible horrible disgusting boring dreadful bland disappointing nasty broken rude miserable"
).split()
NOUNS = (
    "pizza movie hotel concert soup book service coffee museum game trip show cake room lesson"
    " park bus salad song shop"
).split()
# train / held-out templates are disjoint; {noun} and {adj} are filled in.
SENT_TRAIN = [
    "The {noun} was {adj}.",
    "I thought the {noun} was {adj}.",
    "Honestly, the {noun} felt {adj}.",
    "Our {noun} today was {adj}.",
    "My friend said the {noun} is {adj}.",
    "Review: the {noun} was {adj}.",
    "We found the {noun} {adj}.",
    "What a {adj} {noun} that was.",
    "The {noun} we had was {adj}!",
    "{adj} {noun}, to be honest.",
    "It was a {adj} {noun}.",
    "Yesterday I tried the {noun} and it was {adj}.",
    "My mother called the {noun} {adj}.",
    "This {noun} is so {adj}.",
    "In short, a {adj} {noun}.",
    "The new {noun} looks {adj} to me.",
]
SENT_HELDOUT = [  # new arrangements of words that occur in the training prompts
    "Honestly, I thought this {noun} was so {adj}.",
    "My friend found the new {noun} {adj}.",
    "Today the {noun} felt {adj} to me.",
]
# reply pools; pos[i] and neg[i] have similar lengths.
POS_REPLY = [
    "Glad to hear it went well!",
    "That sounds great, enjoy it!",
    "Wonderful, I am happy for you!",
    "Nice, thanks for the kind words!",
    "Great news, glad you liked it.",
    "Happy to hear that, thank you!",
]
NEG_REPLY = [
    "Sorry to hear it went badly.",
    "That sounds bad, I am sorry.",
    "Oh no, I hope it gets better.",
    "Sorry, thanks for telling us.",
    "Bad news, sorry you hated it.",
    "Sad to hear that, I apologize.",
]

CATEGORIES = {
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "black", "white"],
    "animal": ["cat", "dog", "horse", "rabbit", "tiger", "mouse", "sheep", "lion"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear"],
}
CAT_TRAIN = [
    "Which one is a {cat}: {a} or {b}?",
    "Pick the {cat}: {a} or {b}.",
    "Is {a} or {b} a {cat}?",
    "Name the {cat} among {a} and {b}.",
    "{a} or {b}: which is a {cat}?",
    "I need a {cat}. Should I take {a} or {b}?",
    "Choose a {cat} from {a} and {b}.",
    "Which is the {cat} here, {a} or {b}?",
]
CAT_HELDOUT = [
    "Choose the {cat} among {a} and {b}.",
    "I need to pick a {cat}: {a} or {b}?",
]
CAT_REPLY = ["It is {x}.", "The {cat} is {x}.", "That would be {x}."]

GENERIC_TEXT = """\
Once upon a time there was a small village near a quiet river. The people who lived there
worked in the fields every morning and told stories in the evening. Children played in the
park, and the old baker sold bread, cake and coffee to anyone who walked past his shop.
Learning a new language takes time. You read a little every day, you listen to people talk,
and you try to answer questions even when you are not sure. Mistakes are part of learning.
The weather today is warm and sunny, but the radio says it will rain tomorrow afternoon.
Please remember to bring an umbrella, a book for the bus, and something to eat for lunch.
Good software is simple to read, easy to test, and kind to the people who have to change it.
Thank you for your help! I really appreciate it. Could you tell me where the station is?
Yes, of course. Go straight ahead, turn left at the museum, and it is on your right.
What time is it? It is half past seven. How are you? I am fine, thanks, and you?
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, 0 1 2 3 4 5 6 7 8 9.
"""


# ------------------------------------------------------------------------------ data
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentiment(rng: random.Random, templates: list[str], k: int) -> tuple[str, str, str]:
    """k-th sentiment pair: template, polarity and reply pair cycle so none of them
    correlates with the preference; noun and adjective are drawn at random."""
    n_t = len(templates)
    positive = (k // n_t) % 2 == 0
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    prompt = _cap(templates[k % n_t].format(noun=rng.choice(NOUNS), adj=adj))
    r = (k // (2 * n_t)) % len(POS_REPLY)
    good, bad = POS_REPLY[r], NEG_REPLY[r]
    return (prompt, good, bad) if positive else (prompt, bad, good)


_CAT_PAIRS = [(c, o) for c in sorted(CATEGORIES) for o in sorted(CATEGORIES) if c != o]


def _category(rng: random.Random, templates: list[str], k: int) -> tuple[str, str, str]:
    """k-th category pair: template, (asked, other) category and answer position cycle."""
    n_t, n_c = len(templates), len(_CAT_PAIRS)
    cat, other = _CAT_PAIRS[(k // n_t) % n_c]
    x, y = rng.choice(CATEGORIES[cat]), rng.choice(CATEGORIES[other])
    a, b = (x, y) if (k // (n_t * n_c)) % 2 == 0 else (y, x)
    prompt = _cap(templates[k % n_t].format(cat=cat, a=a, b=b))
    reply = rng.choice(CAT_REPLY)
    return prompt, reply.format(x=x, cat=cat), reply.format(x=y, cat=cat)


def make_pairs(
    rng: random.Random, n: int, sent_t: list[str], cat_t: list[str], exclude: set[str]
) -> list[tuple[str, str, str]]:
    """``n`` unique-prompt (prompt, chosen, rejected) triples, 3/5 sentiment, 2/5 category."""
    out: list[tuple[str, str, str]] = []
    seen = set(exclude)
    counts = {"sentiment": 0, "category": 0}
    while len(out) < n:
        kind = "sentiment" if len(out) % 5 < 3 else "category"
        make, templates = (_sentiment, sent_t) if kind == "sentiment" else (_category, cat_t)
        prompt, chosen, rejected = make(rng, templates, counts[kind])
        if prompt in seen:  # redraw the random words, keep the stratification slot
            continue
        seen.add(prompt)
        counts[kind] += 1
        out.append((prompt, chosen, rejected))
    rng.shuffle(out)
    return out


def format1(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "chosen": {"messages": [user, {"role": "assistant", "content": chosen}]},
        "rejected": {"messages": [dict(user), {"role": "assistant", "content": rejected}]},
    }


def format2(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": chosen}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def render(messages: list[dict]) -> str:
    """ChatML render, identical to CHAT_TEMPLATE (used for the tokenizer corpus)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# ------------------------------------------------------------------------- tokenizer
def build_tokenizer(corpus: list[str]):
    """Train a byte-level BPE on ``corpus`` and wrap it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2 style regex split: a newline is always its own pre-token (never merged with
    # the word before or after it), and special tokens are split off before that, so
    # "<|im_start|>assistant\n" tokenizes identically with or without a reply after it.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out: Path = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(SEED)
    heldout = make_pairs(rng, N_HELDOUT, SENT_HELDOUT, CAT_HELDOUT, exclude=set())
    train = make_pairs(rng, N_TRAIN, SENT_TRAIN, CAT_TRAIN, exclude={p for p, _, _ in heldout})
    assert not {p for p, _, _ in train} & {p for p, _, _ in heldout}
    seen = {w for p, _, _ in train for w in _words(p)}
    unseen = {w for p, _, _ in heldout for w in _words(p)} - seen
    assert not unseen, f"held-out prompts use words absent from training prompts: {unseen}"

    for name, rows, fmt in (("train", train, format1), ("heldout", heldout, format2)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(fmt(*row), ensure_ascii=False) + "\n")

    corpus = [line for line in GENERIC_TEXT.splitlines() if line.strip()]
    for prompt, chosen, rejected in train:
        user = {"role": "user", "content": prompt}
        corpus.append(render([user, {"role": "assistant", "content": chosen}]))
        corpus.append(render([user, {"role": "assistant", "content": rejected}]))
    tok = build_tokenizer(corpus)
    for stale in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        (out / stale).unlink(missing_ok=True)
    tok.save_pretrained(str(out))
    print(f"wrote {out}: vocab={len(tok)} train={len(train)} heldout={len(heldout)}")


if __name__ == "__main__":
    main()
