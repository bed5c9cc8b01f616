"""What one preftune training step costs next to a plain forward + backward of the same tokens.

    python bench/step_cost.py [--fixture balanced|prompt_heavy|real_vocab] [--steps 6] [--threads 2]
                              [--precision fp32|bf16-mixed|bf16-true|fp16-mixed] [--checkpointing]
                              [--device cpu|cuda]

The plain step is what any trainer must at least do: one causal forward over each pair's tokens
with the prompt counted once (``prompt + chosen + rejected`` as one row), the model's own logits,
a cross-entropy on every position, backward, and a fused AdamW step. preftune's step is
``LocalBackend.forward_backward`` with the DPO loss (reference numbers given) plus ``optim_step``
on the same pairs. Both alternate on one model in one process; the report is min and median of
each and their ratio (issue 13's target: preftune <= 1.1x plain). Also shown: the plain step with
the prompt computed twice (one row per sequence, as TRL and the plain DPO loop do).

``--precision`` sets ``[local] precision`` (the plain steps run their forward under the same
autocast, without loss scaling) and ``--checkpointing`` ``[local] activation_checkpointing``; the
report adds preftune's tokens/s and its step's peak memory (CUDA: allocated by torch; CPU: the
process's peak resident memory before the plain steps run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from preftune import AdamParams, Config, PairLogps, TokenizedPair
from preftune.loop import BoundLoss, optimizer_step
from preftune.plugins.dpo import DPOLoss
from preftune.plugins.local import LocalBackend, LocalOptions
from preftune.plugins.local_engine import autocast
from preftune.plugins.local_precision import PRECISIONS
from preftune.tiny import tiny_tokenizer

SHAPES = {  # (model config, prompt, chosen, rejected tokens, pairs per step)
    "balanced": ("qwen3", 200, 200, 190, 8),
    "prompt_heavy": ("qwen3", 480, 120, 110, 8),
    "real_vocab": ("smollm2", 150, 150, 140, 4),
}


def build_model(kind: str, directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    if kind == "qwen3":
        config = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=768,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
        model = Qwen3ForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=4096, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def make_pairs(n: int, p: int, c: int, r: int, vocab: int) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(1)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, vocab, (k,), generator=gen).tolist())

    return [TokenizedPair(ids(p), ids(c), ids(r), (1.0,) * c, (1.0,) * r) for _ in range(n)]


def plain_step(model: Any, optimizer: Any, rows: list[list[int]], compute: torch.dtype) -> None:
    width = max(len(t) for t in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, tokens in enumerate(rows):
        ids[i, : len(tokens)], mask[i, : len(tokens)] = torch.tensor(tokens), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with autocast(model.device, compute):
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=False).logits
    loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
    (loss * mask[:, 1:]).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn: Any, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(fn: Any, device: torch.device) -> float:
    """Peak memory of a step ``fn``: torch's allocations on CUDA; on the CPU the process's peak
    resident memory so far (run it before anything else big)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 20)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", choices=sorted(SHAPES), default="balanced")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    kind, p, c, r, n = SHAPES[args.fixture]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(kind, Path(tmp))
        config = Config(base_model=tmp, dataset="unused", device=args.device, learning_rate=1e-6,
                        weight_decay=0.0, max_seq_len=p + max(c, r))
        options = LocalOptions(threads=args.threads, precision=args.precision,
                               activation_checkpointing=args.checkpointing)
        backend = LocalBackend(config, options, tiny_tokenizer())
        device, compute = backend.device, backend.precision.compute
        vocab = backend.model.get_input_embeddings().num_embeddings
        pairs = make_pairs(n, p, c, r, vocab)
        ref = PairLogps(torch.full((n,), -1e3), torch.full((n,), -1e3), torch.full((n,), c * 1.0),
                        torch.full((n,), r * 1.0)).to(device)
        once = [list(x.prompt + x.chosen + x.rejected) for x in pairs]
        twice = [list(x.prompt + x.chosen) for x in pairs] + [list(x.prompt + x.rejected) for x in pairs]
        plain_opt = torch.optim.AdamW(backend.params, lr=1e-6, weight_decay=0.0, fused=True)

        def preftune_step() -> None:
            out = backend.forward_backward(pairs, BoundLoss(DPOLoss(0.1), ref, 1.0))
            optimizer_step(backend, [(out, 1.0)], AdamParams(1e-6), 1, pairs)  # the loop's one sync

        contenders = {"preftune": preftune_step,
                      "plain (prompt once)": lambda: plain_step(backend.model, plain_opt, once, compute),
                      "plain (prompt twice)": lambda: plain_step(backend.model, plain_opt, twice, compute)}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        preftune_step()  # warm-up
        peak = peak_memory_mb(preftune_step, device)  # before the plain steps add their own
        for fn in list(contenders.values())[1:]:  # warm-up
            fn()
        for _ in range(args.steps):
            for name, fn in contenders.items():
                times[name].append(timed(fn, device))
    tokens = sum(x.num_tokens for x in pairs)
    print(f"fixture {args.fixture}: {n} pairs of prompt {p} + chosen {c} + rejected {r} tokens, "
          f"layout {backend.plan.layout}, threads {args.threads}, device {device}, precision "
          f"{backend.precision.name}, activation checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"  preftune {tokens / statistics.median(times['preftune']):9.0f} tokens/s   "
          f"peak memory {peak:8.0f} MiB")
    base = statistics.median(times["plain (prompt once)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<22} min {min(values):7.3f} s  median {median:7.3f} s  "
              f"x{median / base:5.2f} of plain (prompt once)")


if __name__ == "__main__":
    main()
