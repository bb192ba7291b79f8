"""One request's generation as the event loop sees it, and the responses that carry it.

The engine's worker thread hands events to the loop with ``call_soon_threadsafe``: no thread of the
loop's pool waits on a generation. Whatever way a request ends — answered, failed, or its client
gone — its cancel event is set, so the worker stops at the next token and closes its session on
the servers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from corolla.api.engine import Backend, Event, Finished, Piece
from corolla.api.errors import api_error
from corolla.api.formats import DONE, ResponseFormat, Summary, sse
from corolla.api.metrics import ApiMetrics
from corolla.api.schemas import SamplingParams

DISCONNECT_POLL_S = 0.25


class LiveGeneration:
    """Starts a generation on the engine and yields its events on the running loop."""

    def __init__(
        self, engine: Backend, prompt_ids: list[int], params: SamplingParams, metrics: ApiMetrics
    ) -> None:
        self.cancelled = threading.Event()
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._started, self._waiting_first = time.perf_counter(), True
        engine.start(prompt_ids, params, self.cancelled, self._emit)

    def _emit(self, event: Event) -> None:
        """Called by the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def _deliver(self, event: Event) -> None:
        """On the loop: count what was generated (even when nobody reads it any more), queue it."""
        if self._waiting_first and isinstance(event, Piece | Finished):
            self._waiting_first = False
            self.metrics.first_token.observe(time.perf_counter() - self._started)
        if isinstance(event, Finished):
            self.metrics.prompt_tokens.inc(event.prompt_tokens)
            self.metrics.completion_tokens.inc(event.completion_tokens)
        self._queue.put_nowait(event)

    async def next(self) -> Piece | Finished:
        """The next text increment or the ``Finished``; raises what ended the generation."""
        event = await self._queue.get()
        if isinstance(event, Exception):
            raise event
        return event

    def cancel(self) -> None:
        self.cancelled.set()


class LiveChoices:
    """The generations of one request (``n`` per prompt, a list of prompts), run concurrently, each
    in its own session (a server merges their decode steps); their events in arrival order, each
    with its choice's index."""

    def __init__(
        self, engine: Backend, jobs: Sequence[tuple[list[int], SamplingParams]], metrics: ApiMetrics
    ) -> None:
        self.lives = [LiveGeneration(engine, ids, params, metrics) for ids, params in jobs]
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(i, live)) for i, live in enumerate(self.lives)]

    async def _pump(self, index: int, live: LiveGeneration) -> None:
        try:
            while not isinstance(event := await live.next(), Finished):
                self._queue.put_nowait((index, event))
            self._queue.put_nowait((index, event))
        except Exception as error:
            self._queue.put_nowait((index, error))

    def __len__(self) -> int:
        return len(self.lives)

    async def next(self) -> tuple[int, Piece | Finished]:
        """The next event of any choice, with its index; raises what ended a choice's generation."""
        index, event = await self._queue.get()
        if isinstance(event, Exception):
            raise event
        return index, event

    async def collect(self) -> list[tuple[Piece, Finished]]:
        """Each choice's whole text (with all its tokens' log-probabilities) and its ``Finished``."""
        parts: list[list[Piece]] = [[] for _ in self.lives]
        finished: dict[int, Finished] = {}
        while len(finished) < len(self.lives):
            index, event = await self.next()
            if isinstance(event, Finished):
                finished[index] = event
            else:
                parts[index].append(event)
        return [(Piece.join(pieces), finished[i]) for i, pieces in enumerate(parts)]

    def cancel(self) -> None:
        for live in self.lives:
            live.cancel()
        for pump in self._pumps:
            pump.cancel()


@contextlib.asynccontextmanager
async def watching_disconnect(request: Request, live: LiveChoices) -> AsyncIterator[None]:
    """While inside, a client that goes away cancels ``live`` (checked every ``DISCONNECT_POLL_S``)."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        live.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def event_stream(
    first: tuple[int, Piece | Finished], choices: LiveChoices, fmt: ResponseFormat, prompt_tokens: int
) -> AsyncIterator[str]:
    """Server-sent events: each choice's opening chunk, one chunk per text increment (with its
    choice's index), each choice's closing chunk (the last one with ``usage`` and ``route``),
    ``[DONE]``. A failure mid-stream is sent as an error event."""
    for index in range(len(choices)):
        if (opening := fmt.opening(index)) is not None:
            yield sse(opening)
    index, event = first
    finished: dict[int, Finished] = {}
    try:
        while True:
            if isinstance(event, Finished):
                finished[index] = event
                last = len(finished) == len(choices)
                for payload in fmt.closing(
                    event, index, Summary.of(finished, prompt_tokens) if last else None
                ):
                    yield sse(payload)
                if last:
                    break
            elif (payload := fmt.chunk(event, index)) is not None:
                yield sse(payload)
            index, event = await choices.next()
    except Exception as error:
        yield sse(api_error(error).body())
    yield DONE


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` however the stream ends (finished, failed, or
    cancelled because the client disconnected)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
