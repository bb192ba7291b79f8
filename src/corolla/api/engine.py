"""The generation engine: one tokenizer and one distributed model, one worker thread per request.

Each request generates in its own thread, inside its own inference session (sessions are per
thread), so concurrent requests are served concurrently. The worker reports through ``emit``:
text increments (``Piece``: text, with its tokens' log-probabilities when asked for), then one
``Finished`` — or the exception that ended it. Stop strings,
cancellation and incremental decoding happen in a ``StoppingCriteria`` that transformers calls
once per new token, before the next step is sent to the swarm, so a stop string or a cancel costs
no extra step, and leaving the session closes it on the servers."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from corolla.api.constrained import GrammarConstraint, llguidance_tokenizer
from corolla.api.errors import InvalidRequest
from corolla.api.prompts import Message, encode_chat, encode_text
from corolla.api.schemas import DEFAULT_MAX_TOKENS, FinishReason, SamplingParams
from corolla.api.text import IncrementalDecoder, StopScanner
from corolla.config import LimitsConfig
from corolla.swarm.spans import ServerSpan, coverage, missing_blocks

if TYPE_CHECKING:
    from corolla.client.manager import SequenceManager
    from corolla.client.model import DistributedModelForCausalLM
    from corolla.client.routing import Hop

logger = logging.getLogger(__name__)

MAX_SESSIONS = LimitsConfig.max_sessions_per_peer  # generations at once (servers' default limit)


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    route: tuple[Hop, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the model and the most likely tokens in its place
    (``logprob`` and ``top`` are ``None`` for a prompt's first token: nothing predicts it)."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] | None = ()  # (token, log-probability), most likely first


@dataclass(frozen=True)
class Piece:
    """A text increment, with the log-probabilities of the tokens it completes (when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def join(cls, pieces: Sequence[Piece]) -> Piece:
        """One piece of all their text, with all their tokens' log-probabilities."""
        return cls("".join(p.text for p in pieces), tuple(s for p in pieces for s in p.logprobs))


Event = Piece | Finished | Exception
Tools = list[dict[str, Any]] | None  # OpenAI's tools (tools.py)
Emit = Callable[[Event], None]


class Backend(Protocol):
    """What the HTTP app needs of an engine (``Engine``; a fake one in tests)."""

    model_id: str  # listed by /v1/models
    names: tuple[str, ...]  # what requests may call the model

    def encode_chat(self, messages: Sequence[Message], tools: Tools = None) -> list[int]: ...
    def encode_text(self, prompt: str | list[int]) -> list[int]: ...
    def start(self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event,
              emit: Emit) -> threading.Thread: ...  # fmt: skip
    def serves_all_blocks(self) -> bool: ...
    def swarm(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- pure planning


def context_limit(spans: Sequence[ServerSpan], num_blocks: int, max_positions: int) -> int:
    """The longest session (prompt + answer) the swarm can hold: the largest announced
    ``max_inference_length`` whose servers still cover every block, and no more than the model's
    positions. With no full cover at all, just the model's positions."""
    for limit in sorted({s.info.max_inference_length for s in spans}, reverse=True):
        able = [s for s in spans if s.info.max_inference_length >= limit]
        if min(coverage(able, num_blocks), default=0) > 0:
            return min(limit, max_positions)
    return max_positions


def plan_max_tokens(requested: int | None, prompt_tokens: int, limit: int) -> int:
    """Tokens to generate: as requested (default ``DEFAULT_MAX_TOKENS``), capped so that prompt +
    answer fit in ``limit``; a prompt that leaves no room is the request's fault."""
    room = limit - prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"the prompt is {prompt_tokens} tokens; this swarm's context is {limit} tokens, "
            "which leaves no room for an answer",
            code="context_length_exceeded",
        )
    return min(DEFAULT_MAX_TOKENS if requested is None else requested, room)


# ---------------------------------------------------------------- transformers hooks


class Sampler(LogitsProcessor):
    """Samples the next token with this request's own ``torch.Generator`` (temperature, top-p) and
    leaves only that token possible, so greedy decoding picks it: sampling is reproducible for a
    seed and independent of other requests running at the same time."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % 2**64)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            ordered[(ordered.cumsum(dim=-1) - ordered) > self.top_p] = 0.0  # the first always stays
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
        token = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)  # type: ignore[return-value]


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of the step being generated (the model's distribution, before
    temperature and top-p), for ``Progress`` to read once the step's token is known."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores


def token_logprob(
    logprobs: torch.Tensor, token_id: int, top: int, token_text: Callable[[list[int]], list[str]]
) -> TokenLogprob:
    """``token_id``'s entry from one position's log-probabilities, with the ``top`` most likely."""
    values, ids = logprobs.topk(top) if top else (logprobs[:0], torch.zeros(0, dtype=torch.long))
    texts = token_text([token_id, *ids.tolist()])
    alternatives = tuple(zip(texts[1:], values.tolist(), strict=True))
    return TokenLogprob(token_id, texts[0], float(logprobs[token_id]), alternatives)


class Progress(StoppingCriteria):
    """Called by transformers once per new token: decodes it, emits the text that is safe to send
    (with the log-probabilities of its tokens, when a ``recorder`` keeps them), and stops
    generation at a stop string or when the request is cancelled."""

    def __init__(
        self, prompt_tokens: int, decode: Callable[[list[int]], str], stops: Sequence[str],
        cancelled: threading.Event, emit: Emit, *, recorder: LogprobRecorder | None = None,
        top_logprobs: int = 0, token_text: Callable[[list[int]], list[str]] | None = None,
    ) -> None:  # fmt: skip
        self.prompt_tokens, self.cancelled, self.emit = prompt_tokens, cancelled, emit
        self.decoder = IncrementalDecoder(decode)
        self.scanner = StopScanner(stops)
        self.tokens: list[int] = []
        self.recorder, self.top_logprobs, self.token_text = recorder, top_logprobs, token_text
        self.pending: list[TokenLogprob] = []  # scored tokens whose text is not sent yet

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        for token in input_ids[0, self.prompt_tokens + len(self.tokens) :].tolist():
            self.tokens.append(token)
            if self.recorder is not None and self.recorder.last is not None and self.token_text is not None:
                scored = token_logprob(self.recorder.last, token, self.top_logprobs, self.token_text)
                self.pending.append(scored)
            self._send(self.scanner.feed(self.decoder.push(token)))
            if self.scanner.stopped:
                break
        stop = self.scanner.stopped or self.cancelled.is_set()
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device
        )

    def finish(self) -> None:
        """Release what was held back (an incomplete character, a possible stop-string prefix)."""
        self._send(self.scanner.feed(self.decoder.flush(), final=True), final=True)

    def _send(self, text: str, *, final: bool = False) -> None:
        if text or (final and self.pending):
            self.emit(Piece(text, tuple(self.pending)))
            self.pending.clear()


# ---------------------------------------------------------------- the engine


class Engine:
    """Serves one model of the swarm: prompts in, text increments and a ``Finished`` out."""

    def __init__(self, model_id: str, model: DistributedModelForCausalLM, tokenizer: Any,
                 aliases: Sequence[str] = ()) -> None:  # fmt: skip
        self.model_id, self.model, self.tokenizer = model_id, model, tokenizer
        self.names = tuple(dict.fromkeys([model_id, *aliases]))  # what requests may call the model
        self.max_positions = int(
            getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        )
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        )
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer refuses concurrent mutable use
        self._ll_tokenizer: Any = None  # llguidance's tokenizer, for structured output; built once
        # every generation is a session on the servers, which allow one peer (all of this API's
        # users) MAX_SESSIONS at once: more requests, choices (n) or prompts wait for a free one
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)

    def _grammar_tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                vocab = int(self.model.config.vocab_size)
                self._ll_tokenizer = llguidance_tokenizer(self.tokenizer, vocab, sorted(self.eos_ids))
            return self._ll_tokenizer

    @classmethod
    def load(
        cls, model_id: str, *, initial_peers: Sequence[str], dht_prefix: str | None = None,
        cache_dir: str | None = None, max_wait_for_blocks: float = 5.0, swarm_key: str | None = None,
        identity_path: str | None = None, revision: str | None = None, token: str | None = None,
    ) -> Engine:  # fmt: skip
        """Resolve the model, load its tokenizer and the client half of the model, join the swarm
        (a closed one with ``swarm_key``, the key file; ``identity_path`` keeps the client's peer id);
        ``revision``/``token``: a hub model's branch, tag or commit and an access token."""
        from transformers import AutoTokenizer

        from corolla.client.model import AutoDistributedModelForCausalLM
        from corolla.config import ClientConfig, default_cache_dir
        from corolla.models.resolve import resolve_model

        resolved = resolve_model(model_id, cache_dir or default_cache_dir(), revision=revision, token=token)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        client = ClientConfig(
            initial_peers=tuple(initial_peers), max_wait_for_blocks=max_wait_for_blocks,
            swarm_key=swarm_key, identity_path=identity_path,
        )  # fmt: skip
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_id, dht_prefix=dht_prefix, cache_dir=cache_dir, client_config=client, revision=revision,
            token=token,
        )  # fmt: skip
        return cls(model_id, model, tokenizer, aliases=[resolved.name])

    @property
    def manager(self) -> SequenceManager:
        return self.model.manager

    # --- prompts -------------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[Message], tools: Tools = None) -> list[int]:
        """A conversation's token ids, with the ``tools`` offered (OpenAI's ``tools``) if any."""
        with self._tokenizer_lock:
            return encode_chat(self.tokenizer, messages, tools)

    def encode_text(self, prompt: str | list[int]) -> list[int]:
        """A text prompt's token ids; a prompt given as token ids, checked against the vocabulary."""
        if not isinstance(prompt, str):
            vocab = int(self.model.config.vocab_size)
            if bad := [i for i in prompt if not 0 <= i < vocab]:
                raise InvalidRequest(f"prompt: token id {bad[0]} is not in the vocabulary (0..{vocab - 1})",
                                     param="prompt")  # fmt: skip
            return list(prompt)
        with self._tokenizer_lock:
            return encode_text(self.tokenizer, prompt)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _token_text(self, ids: list[int]) -> list[str]:
        """Each token's own text (special tokens included), as log-probabilities name them."""
        with self._tokenizer_lock:
            return [str(self.tokenizer.decode([i])) for i in ids]

    def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
        """Every prompt token's log-probability given the tokens before it (one forward pass of the
        whole prompt through the swarm), with the ``top`` most likely tokens in its place."""
        with torch.no_grad():
            logits = self.model(torch.tensor([prompt_ids], dtype=torch.long)).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        first = TokenLogprob(prompt_ids[0], self._token_text(prompt_ids[:1])[0], None, None)
        text = self._token_text
        rest = (token_logprob(logprobs[i - 1], prompt_ids[i], top, text) for i in range(1, len(prompt_ids)))
        return [first, *rest]

    # --- generation ----------------------------------------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event,
              emit: Emit) -> threading.Thread:  # fmt: skip
        """Generate in a new thread; every event goes to ``emit`` (called from that thread)."""
        thread = threading.Thread(
            target=self._run,
            args=(prompt_ids, params, cancelled, emit),
            name="corolla-api-generate",
            daemon=True,
        )
        thread.start()
        return thread

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancelled: threading.Event | None = None) -> Iterator[Piece | Finished]:  # fmt: skip
        """Blocking form of ``start``: ``Piece``s, then the ``Finished``; raises what failed.
        Leaving the loop early cancels the generation."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        cancelled = cancelled or threading.Event()
        self.start(prompt_ids, params, cancelled, events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            cancelled.set()

    def _run(self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event,
             emit: Emit) -> None:  # fmt: skip
        try:
            with self._sessions:  # waits while this client holds as many sessions as a server allows it
                if cancelled.is_set():
                    raise InvalidRequest("the request was cancelled before it started")
                finished = self._generate(prompt_ids, params, cancelled, emit)
        except Exception as error:  # the request's to report, not this thread's
            emit(error)
        else:
            emit(finished)

    def _generate(self, prompt_ids: list[int], params: SamplingParams, cancelled: threading.Event,
                  emit: Emit) -> Finished:  # fmt: skip
        limit = context_limit(self.manager.spans(), self.manager.num_blocks, self.max_positions)
        if params.echo:  # the prompt first, with its tokens' log-probabilities when asked for
            top = params.logprobs
            scored = () if top is None else tuple(self.prompt_logprobs(prompt_ids, top))
            emit(Piece(self._decode(prompt_ids), scored))
            if params.max_tokens == 0:  # scoring only
                return Finished("length", len(prompt_ids), 0, ())
        max_tokens = plan_max_tokens(params.max_tokens, len(prompt_ids), limit)
        recorder = None if params.logprobs is None else LogprobRecorder()
        progress = Progress(
            len(prompt_ids), self._decode, params.stop, cancelled, emit,
            recorder=recorder, top_logprobs=params.logprobs or 0, token_text=self._token_text,
        )  # fmt: skip
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": False,  # sampling, when asked for, is the Sampler's: reproducible per request
            "stopping_criteria": StoppingCriteriaList([progress]),
            "pad_token_id": self.pad_id,
        }
        constraint = (
            None if params.grammar is None
            else GrammarConstraint(self._grammar_tokenizer(), params.grammar, len(prompt_ids))
        )  # fmt: skip
        # in this order: log-probabilities are the model's, sampling sees only what the grammar allows
        sampler = Sampler(params) if params.temperature > 0 else None
        processors = [p for p in (recorder, constraint, sampler) if p is not None]
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.no_grad(), self.model.inference_session(len(prompt_ids) + max_tokens) as session:
            self.model.generate(input_ids, **kwargs)
            route = tuple(session.route)
        progress.finish()
        return Finished(
            self._reason(progress, max_tokens, cancelled), len(prompt_ids), len(progress.tokens), route
        )

    def _reason(self, progress: Progress, max_tokens: int, cancelled: threading.Event) -> FinishReason:
        stopped = progress.scanner.stopped or cancelled.is_set()
        if stopped or (progress.tokens and progress.tokens[-1] in self.eos_ids):
            return "stop"
        return "length" if len(progress.tokens) >= max_tokens else "stop"

    # --- the swarm -----------------------------------------------------------------------------

    def serves_all_blocks(self) -> bool:
        """Whether ONLINE servers cover every block right now (blocking: may read the DHT)."""
        return not missing_blocks(self.manager.spans(), self.manager.num_blocks)

    def swarm(self) -> dict[str, Any]:
        """The swarm view of ``corolla swarm --json`` for this model, plus ``model`` and ``complete``
        (blocking: reads the DHT)."""
        from corolla.swarm.registry import fetch_block_records
        from corolla.swarm.view import build_view, to_json

        manager = self.manager
        view = build_view(
            fetch_block_records(manager.dht, manager.dht_prefix, manager.num_blocks),
            manager.dht_prefix,
            manager.num_blocks,
        )
        return {"model": self.model_id, **to_json(view), "complete": not view.uncovered}

    def close(self) -> None:
        """Leave the swarm (the client's P2P handle and DHT peer)."""
        self.manager.shutdown()
