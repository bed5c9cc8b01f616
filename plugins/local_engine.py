"""How the ``local`` backend computes per-sequence log-probs of pairs with one model.

1. Lay the pairs out (``preftune.layout``): the prompt shared by chosen and rejected when the model
   takes custom 4D masks and position ids, else one padded row per sequence.
2. Run the decoder once over the rows.
3. Apply the output layer only at the input positions that predict a completion token (prompt
   positions need no logits), in chunks of positions, so no float32 ``[N, T, V]`` tensor exists:
   with gradients each chunk is checkpointed and its logits are recomputed in the backward pass.
4. Reduce to per-sequence sums and counts (``Layout.reduce``).

Steps 1 and 3 are shortcuts that must not change a number. :func:`calibrate` checks both on probe
pairs when the engine is built and falls back (saying so once) for a model where they differ: a
model whose logits are more than ``output_layer(decoder(x))`` (soft-capping, scaling) gets the
model's own logits; a model that ignores custom masks or position ids gets the padded layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from preftune import PairLogps, TokenizedPair
from preftune.layout import Layout, additive_mask, padded_layout, shared_layout

LOGITS_BUDGET = 1 << 24  # float32 logits elements per chunk (64 MiB) when logits_chunk is auto
MASK_FORMATS = {  # attention implementations that take custom 4D masks -> the form they take
    "sdpa": "bool",
    "eager": "additive",
    "flex_attention": "block",  # a FlexAttention BlockMask: blocks nobody sees are skipped
}


@dataclass
class Plan:
    """What :func:`calibrate` decided for one model."""

    layout: str  # "shared" or "padded"
    split_head: bool  # output layer applied by us, on completion positions only
    chunk: int  # positions per output-layer chunk
    notes: list[str]


class Engine:
    """Per-sequence log-probs of pairs under one model (with or without gradients)."""

    def __init__(self, model: Any, device: torch.device, pad_id: int, plan: Plan,
                 disable_adapter: bool = False, compute: torch.dtype = torch.float32,
                 runner: Callable[[Layout], Tensor] | None = None, sharded: bool = False):
        self.model, self.device, self.pad_id, self.plan = model, device, pad_id, plan
        self.disable_adapter, self.compute = disable_adapter, compute
        self.runner = runner  # a DDP / FSDP wrapper of :class:`Logps` (several processes)
        self.sharded = sharded  # FSDP: its all-gathers need tensors made outside inference mode

    def frozen(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> PairLogps:
        """Log-probs without gradients (inference mode where it can be)."""
        with torch.no_grad() if self.sharded else torch.inference_mode():
            return self(pairs, token_logps)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                 stop: Sequence[int]) -> list[list[int]]:
        """Greedy completions of ``prompts`` (left-padded into one batch) with transformers'
        ``generate``, each cut after its first ``stop`` token. Under FSDP the root's shards
        (embeddings, output layer) are gathered for the whole generation; the decoder layers
        gather theirs per forward as in training, on every rank together."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=list(stop))
        # transformers fills what ``config`` leaves unset from the model's own generation config (a
        # chat model's repetition penalty, say): a blank one for the call keeps the search greedy
        hf_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        own = hf_model.generation_config
        hf_model.generation_config = GenerationConfig()
        gathered = self.runner if self.sharded else None
        if gathered is not None:
            gathered.unshard()
        try:
            with torch.no_grad(), autocast(self.device, self.compute):
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config, synced_gpus=self.sharded)
        finally:  # synced_gpus: under FSDP every rank runs until all have finished (their gathers pair)
            hf_model.generation_config = own
            if gathered is not None:
                gathered.reshard()
        return [until_stop(row, stop) for row in out[:, width:].tolist()]

    def __call__(self, pairs: Sequence[TokenizedPair], token_logps: bool = False) -> PairLogps:
        make = shared_layout if self.plan.layout == "shared" else padded_layout
        layout = make(pairs, self.pad_id).to(self.device)
        adapter_off = self.model.disable_adapter() if self.disable_adapter else nullcontext()
        with adapter_off, autocast(self.device, self.compute):  # the forward only, never the loss
            if self.runner is not None:
                logps_N = self.runner(layout)
            else:
                logps_N = target_logps(self.model, layout, self.plan)
        return layout.reduce(logps_N, token_logps)


class Logps(torch.nn.Module):
    """:func:`target_logps` of a model as one module, so that a DDP or FSDP wrapper around it
    sees the whole forward (the decoder and the output layer) and runs its hooks."""

    def __init__(self, model: Any, plan: Plan):
        super().__init__()
        self.lm, self.plan = model, plan

    def forward(self, layout: Layout) -> Tensor:
        return target_logps(self.lm, layout, self.plan)


def until_stop(tokens: list[int], stop: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first one in ``stop`` (what follows is padding)."""
    stops = set(stop)
    ends = [i for i, token in enumerate(tokens) if token in stops]
    return tokens[:ends[0] + 1] if ends else tokens


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device`` (mixed precision); nothing for float32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def parts(model: Any) -> tuple[Any, Any]:
    """The decoder (hidden states) and the output layer of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def model_inputs(model: Any, layout: Layout) -> dict[str, Any]:
    mask = layout.attention_mask
    if mask.dim() == 4 and mask_format(model) == "additive":
        mask = additive_mask(mask, model.dtype)
    elif mask.dim() == 4 and mask_format(model) == "block":
        mask = block_mask(mask)
    return {"input_ids": layout.input_ids, "attention_mask": mask,
            "position_ids": layout.position_ids, "use_cache": False}


def block_mask(mask: Tensor) -> Any:
    """A ``[R, 1, L, L]`` bool mask as a FlexAttention ``BlockMask``, which transformers' flex
    integration passes to the kernel as it is (a tensor would be added to the scores)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return mask[b, 0, q, kv]

    rows, _, length, _ = mask.shape
    return create_block_mask(visible, B=rows, H=None, Q_LEN=length, KV_LEN=length, device=mask.device)


def mask_format(model: Any) -> str | None:
    return MASK_FORMATS.get(getattr(model.config, "_attn_implementation", None) or "")


def target_logps(model: Any, layout: Layout, plan: Plan) -> Tensor:
    """``[N]`` float32 log-probs of the layout's completion targets."""
    if not plan.split_head:
        logits = model(**model_inputs(model, layout)).logits
        rows = logits.reshape(-1, logits.shape[-1])[layout.target_index]
        return token_logps(rows.float(), layout.targets)
    decoder, head = parts(model)
    hidden = decoder(**model_inputs(model, layout)).last_hidden_state
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])[layout.target_index]
    return chunked_logps(head, hidden_NH, layout.targets, plan.chunk)


def token_logps(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """log softmax(logits)[target] of each row, in float32 (outside any autocast)."""
    with torch.autocast(logits_NV.device.type, enabled=False):
        logits_NV = logits_NV.float()
        return logits_NV.gather(-1, targets_N[:, None])[:, 0] - torch.logsumexp(logits_NV, -1)


def chunked_logps(head: Callable[[Tensor], Tensor], hidden_NH: Tensor, targets_N: Tensor,
                  chunk: int) -> Tensor:
    """``token_logps(head(hidden))`` a chunk of rows at a time. With gradients, each chunk is
    checkpointed: its logits are freed after the forward and recomputed in the backward."""

    def one(h: Tensor, t: Tensor) -> Tensor:
        return token_logps(head(h), t)

    if hidden_NH.shape[0] <= chunk:
        return one(hidden_NH, targets_N)
    grad = torch.is_grad_enabled() and hidden_NH.requires_grad
    pieces = zip(hidden_NH.split(chunk), targets_N.split(chunk))
    if not grad:
        return torch.cat([one(h, t) for h, t in pieces])
    return torch.cat([checkpoint(one, h, t, use_reentrant=False) for h, t in pieces])


def auto_chunk(model: Any, requested: int) -> int:
    """Positions per output-layer chunk: ``requested``, or about 64 MiB of float32 logits."""
    if requested > 0:
        return requested
    _, head = parts(model)
    vocab = head.weight.shape[0] if head is not None else 1
    return max(16, LOGITS_BUDGET // vocab)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The stack of repeated decoder blocks (the longest ``ModuleList`` of the decoder)."""
    decoder, _ = parts(model)
    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def checkpoint_layers(model: Any) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (activation checkpointing, in eval mode: no dropout). Returns the number of layers wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward)
    return len(layers)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def probe_pairs(vocab: int) -> list[TokenizedPair]:
    """Pairs of random tokens whose segments exercise packing and one-token completions."""
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, vocab, (n,), generator=gen).tolist())

    shapes = [(7, 5, 4), (3, 2, 2), (2, 1, 3)]
    return [TokenizedPair(ids(p), ids(c), ids(r), (1.0,) * c, (1.0,) * r) for p, c, r in shapes]


def vocab_size(model: Any) -> int:
    """Rows of the input embeddings (under a LoRA wrapper when LoRA targets them)."""
    embeddings = model.get_input_embeddings()
    return int(getattr(embeddings, "base_layer", embeddings).num_embeddings)


@torch.inference_mode()
def calibrate(model: Any, device: torch.device, layout: str, chunk: int,
              max_seq_len: int, compute: torch.dtype = torch.float32) -> Plan:
    """Decide the layout and the output-layer path for ``model``, checked on probe pairs under
    the autocast of training (``compute``: the dtype whose rounding the comparison allows)."""
    with autocast(device, compute):
        return _calibrate(model, device, layout, chunk, max_seq_len, _compute_dtype(model, compute))


def _compute_dtype(model: Any, compute: torch.dtype) -> torch.dtype:
    """What the model computes in: the autocast dtype, or the weights' own when they are lower."""
    return compute if compute != torch.float32 else model.dtype


def _calibrate(model: Any, device: torch.device, layout: str, chunk: int, max_seq_len: int,
               compute: torch.dtype) -> Plan:
    notes: list[str] = []
    pairs = probe_pairs(min(vocab_size(model), 1000))
    padded = padded_layout(pairs).to(device)
    expected = target_logps(model, padded, Plan("padded", False, chunk, []))
    split_head = _close(target_logps(model, padded, Plan("padded", True, chunk, [])), expected,
                        compute)
    if not split_head:
        notes.append("the model's logits are not its output layer applied to its hidden states; "
                     "computing full logits (more memory)")
    if layout == "padded":
        return Plan("padded", split_head, chunk, notes)
    why = shared_unsupported(model, max_seq_len)
    if why is None:
        shared = Plan("shared", split_head, chunk, [])
        if not _close(target_logps(model, shared_layout(pairs).to(device), shared), expected,
                      compute):
            why = "its log-probs with a custom 4D mask and position ids differ from the plain ones"
    if why is None:
        return Plan("shared", split_head, chunk, notes)
    notes.append(f"the prompt is computed twice per pair (padded layout): {why}")
    return Plan("padded", split_head, chunk, notes)


def shared_unsupported(model: Any, max_seq_len: int) -> str | None:
    """Why the shared-prompt layout cannot be used with ``model``, or None."""
    impl = getattr(model.config, "_attn_implementation", None)
    if mask_format(model) is None:
        return (f"attention implementation {impl!r} takes no custom 4D masks (sdpa, eager and "
                "flex_attention do)")
    window = getattr(model.config, "sliding_window", None)
    layer_types = getattr(model.config, "layer_types", None) or []
    sliding = any("sliding" in str(t) for t in layer_types) or getattr(
        model.config, "use_sliding_window", False)
    if sliding and window is not None and window < max_seq_len:
        return f"sliding-window attention ({window}) shorter than max_seq_len ({max_seq_len})"
    return None


def _close(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    """Equal up to rounding in the dtype the model computes in (a wrong mask or position changes
    a trained model's log-probs by far more)."""
    atol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-1
    return bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=0))
