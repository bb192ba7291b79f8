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
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from corolla.api.engine import Backend, Event, Finished, Piece
from corolla.api.errors import api_error
from corolla.api.formats import DONE, ResponseFormat, sse
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

    async def collect(self) -> tuple[Piece, Finished]:
        """The whole text (with all its tokens' log-probabilities) and the ``Finished``."""
        parts: list[Piece] = []
        while not isinstance(event := await self.next(), Finished):
            parts.append(event)
        whole = Piece("".join(p.text for p in parts), tuple(s for p in parts for s in p.logprobs))
        return whole, event

    def cancel(self) -> None:
        self.cancelled.set()


@contextlib.asynccontextmanager
async def watching_disconnect(request: Request, live: LiveGeneration) -> AsyncIterator[None]:
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
    first: Piece | Finished, live: LiveGeneration, fmt: ResponseFormat
) -> AsyncIterator[str]:
    """Server-sent events: the opening chunk, one chunk per text increment, the closing chunk (with
    ``usage`` and ``route``), ``[DONE]``. A failure mid-stream is sent as an error event."""
    opening = fmt.opening()
    if opening is not None:
        yield sse(opening)
    event = first
    try:
        while not isinstance(event, Finished):
            yield sse(fmt.chunk(event))
            event = await live.next()
        yield sse(fmt.closing(event))
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
