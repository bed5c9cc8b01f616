"""A plain PyTorch DPO loop: the floor that preftune and TRL are measured against.

Each conversation is rendered whole with the chat template; its completion is what follows the
rendered prompt. Reference log-probs are computed once under ``no_grad``; then each step runs one
padded batch (chosen rows, then rejected rows), sigmoid DPO on summed completion log-probs, AdamW.
"""

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from benchutil import REPORT, install_report, read_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer


def render(tok: Any, messages: list[dict], prompt: bool = False) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                   return_dict=True)["input_ids"]


def completion_logps(model: Any, rows: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Summed log-probs of each row's completion; a row is (token ids, prompt length)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    keep = torch.tensor([[0] * p + [1] * (len(i) - p) + [0] * (width - len(i)) for i, p in rows])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    logps = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (logps * keep[:, 1:]).sum(-1)


def main(a: argparse.Namespace) -> None:
    if a.threads:  # 0: torch's default
        torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()  # eval: no dropout
    pairs = []
    for p in read_pairs(a.data):
        n = len(render(tok, p["prompt"], prompt=True))
        pairs.append([(render(tok, p["prompt"] + p[s]), n) for s in ("chosen", "rejected")])
    start = time.perf_counter()
    with torch.no_grad():  # ref[i] = (chosen, rejected) reference log-probs of pair i
        chunks = [pairs[i:i + a.ref_batch] for i in range(0, len(pairs), a.ref_batch)]
        ref = torch.cat([completion_logps(model, [r for p in c for r in p], tok.pad_token_id).view(-1, 2)
                         for c in chunks])
    REPORT["ref_s"] = time.perf_counter() - start
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, fused=True)  # CPU kernel
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(a.seed)).tolist()
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(a.steps):
        index = order[step * a.batch:(step + 1) * a.batch]
        rows = [pairs[i][0] for i in index] + [pairs[i][1] for i in index]
        logps = completion_logps(model, rows, tok.pad_token_id).view(2, -1)
        margin = (logps[0] - ref[index, 0]) - (logps[1] - ref[index, 1])
        loss = -F.logsigmoid(a.beta * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the step's one host sync
        tokens += sum(len(ids) for ids, _ in rows)
    REPORT.update(train_s=time.perf_counter() - start, tokens=tokens, losses=losses)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)


if __name__ == "__main__":
    install_report()
    parser = argparse.ArgumentParser(description=__doc__)
    for name, kind in [("model", str), ("data", str), ("out", str), ("steps", int), ("batch", int),
                       ("ref-batch", int), ("lr", float), ("beta", float), ("threads", int), ("seed", int)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    main(parser.parse_args())
