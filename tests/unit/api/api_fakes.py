"""A fake engine: the API's HTTP behaviour without a swarm."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from corolla.api.engine import Emit, Finished, Piece, TokenLogprob
from corolla.api.schemas import SamplingParams
from corolla.client.routing import Hop

ROUTE = (Hop("12D3KooWpeerA", 0, 2), Hop("12D3KooWpeerB", 2, 4))


class FakeEngine:
    """Answers every prompt with ``pieces``, or fails with ``error``; records what it was asked."""

    model_id = "fake-model"
    names = ("fake-model", "fake-alias")

    def __init__(
        self,
        pieces: Sequence[str] = ("Hel", "lo", "!"),
        error: Exception | None = None,
        complete: bool = True,
    ) -> None:
        self.pieces, self.error, self.complete = list(pieces), error, complete
        self.params: list[SamplingParams] = []
        self.prompts: list[list[int]] = []
        self.messages: list[list[dict[str, Any]]] = []
        self.tools: list[list[dict[str, Any]] | None] = []
        self.done = threading.Event()

    def encode_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
        self.messages.append(messages)
        self.tools.append(tools)
        return [1, 2, 3, 4]

    def encode_text(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else list(range(len(prompt.split())))

    def start(
        self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event, emit: Emit
    ) -> threading.Thread:
        self.params.append(params)
        self.prompts.append(prompt_ids)

        def run() -> None:
            if self.error is not None:
                emit(self.error)
            else:
                for i, piece in enumerate(self.pieces):
                    scored = () if params.logprobs is None else (fake_logprob(i, params.logprobs),)
                    emit(Piece(piece, scored))
                emit(Finished("length", len(prompt_ids), len(self.pieces), ROUTE))
            self.done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def serves_all_blocks(self) -> bool:
        return self.complete

    def swarm(self) -> dict[str, Any]:
        return {"model": self.model_id, "num_blocks": 4, "servers": [], "complete": self.complete}


def fake_logprob(i: int, top: int) -> TokenLogprob:
    """The i-th piece's one token: log-probability -0.5 * (i + 1), its ``top`` alternatives below."""
    alternatives = tuple((f"alt{k}", -0.5 * (i + 1) - k - 1) for k in range(top))
    return TokenLogprob(i, f"tok{i}", -0.5 * (i + 1), alternatives)
