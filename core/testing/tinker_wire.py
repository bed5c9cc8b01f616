"""The protobuf half of the Tinker wire: forward/backward requests in, their outputs out.

The message classes come from the ``tinker`` wheel itself (``tinker.proto.tinker_public_pb2``), so
the emulator speaks exactly what the installed client speaks. Everything else on that wire is JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .trainer import Datum

_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


def _pb() -> Any:
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def _tensor(msg: Any) -> np.ndarray:
    pb = _pb()
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}[msg.dtype]
    if msg.HasField("sparse_csr"):
        raise ValueError("sparse loss_fn_inputs are not emulated")
    return np.frombuffer(msg.dense, dtype=dtype)


def decode_forward_backward(body: bytes) -> tuple[str, str, bool, list[Datum]]:
    """``(model_id, loss_fn, forward_only, datums)`` of a ``ForwardBackwardRequest``."""
    msg = _pb().ForwardBackwardRequest()
    msg.ParseFromString(body)
    datums = []
    for d in msg.data:
        tokens: list[int] = []
        for chunk in d.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise ValueError("only text chunks are emulated")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        targets = _tensor(d.loss_fn_inputs["target_tokens"]).astype(np.int64).tolist()
        weights = (_tensor(d.loss_fn_inputs["weights"]).astype(np.float32).tolist()
                   if "weights" in d.loss_fn_inputs else [0.0] * len(targets))
        if not (len(tokens) == len(targets) == len(weights)):
            raise ValueError(f"datum lengths differ: {len(tokens)} tokens, {len(targets)} "
                             f"targets, {len(weights)} weights")
        datums.append(Datum(tokens, targets, weights))
    return msg.model_id, msg.loss_fn, msg.forward_only, datums


def encode_output(logprobs: list[list[float]], metrics: dict[str, float]) -> bytes:
    """A ``ForwardBackwardOutput`` holding each datum's ``logprobs`` and the metrics."""
    pb = _pb()
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    record = out.loss_fn_outputs.add()
    record.num_datums = len(logprobs)
    field = record.fields["logprobs"]
    field.dtype = pb.DTYPE_FLOAT32
    arrays = [np.asarray(row, dtype=np.float32) for row in logprobs]
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64).tobytes()
    for key, value in metrics.items():
        out.metrics[key] = float(value)
    return out.SerializeToString()
