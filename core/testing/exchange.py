"""The emulator's requests and answers, shared by its routes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class Reply(Exception):
    """Raised by a route to answer with an HTTP error (the JSON body says why)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.body = status, {"error": message, "message": message, **extra}


class Failed(Exception):
    """Raised by a route whose request is accepted but whose result is an error (the client
    sees it when it fetches the future), as a service reports a trainer that died."""

    def __init__(self, message: str, category: str = "server"):
        super().__init__(message)
        self.body = {"error": message, "category": category}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    content_type: str = "application/json"

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()
