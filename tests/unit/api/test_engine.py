"""The engine's pure parts: context limits, token budgets, seeded sampling, per-token progress."""

from __future__ import annotations

import threading

import pytest
import torch

from corolla.api.engine import LogprobRecorder, Progress, Sampler, context_limit, plan_max_tokens
from corolla.api.errors import InvalidRequest
from corolla.api.schemas import DEFAULT_MAX_TOKENS, SamplingParams
from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.spans import ServerSpan


def span(peer: str, start: int, end: int, max_length: int) -> ServerSpan:
    info = ServerInfo(
        state=ServerState.ONLINE,
        start_block=start,
        end_block=end,
        throughput=1.0,
        torch_dtype="float32",
        version="test",
        max_inference_length=max_length,
        cache_tokens_left=1000,
    )
    return ServerSpan(peer, start, end, info)


def test_context_limit_is_the_longest_that_still_covers_every_block() -> None:
    spans = [span("a", 0, 4, 2048), span("b", 0, 2, 8192), span("c", 2, 4, 512)]
    assert context_limit(spans, 4, max_positions=100_000) == 2048  # b + c only reach 512; a alone 2048
    assert context_limit(spans, 4, max_positions=1024) == 1024
    assert context_limit([span("b", 0, 2, 8192)], 4, max_positions=4096) == 4096  # no full cover
    assert context_limit([], 4, max_positions=512) == 512


def test_max_tokens_default_and_cap() -> None:
    assert plan_max_tokens(None, 10, 1000) == DEFAULT_MAX_TOKENS
    assert plan_max_tokens(50, 10, 1000) == 50
    assert plan_max_tokens(5000, 10, 1000) == 990
    assert plan_max_tokens(None, 999, 1000) == 1
    with pytest.raises(InvalidRequest) as caught:
        plan_max_tokens(None, 1000, 1000)
    assert caught.value.code == "context_length_exceeded" and "1000 tokens" in str(caught.value)


def sample(params: SamplingParams, scores: torch.Tensor, steps: int = 20) -> list[int]:
    sampler = Sampler(params)
    ids = torch.zeros((1, 1), dtype=torch.long)
    picks = []
    for _ in range(steps):
        out = sampler(ids, scores.clone())  # type: ignore[arg-type]
        assert torch.isfinite(out).sum() == 1  # only the sampled token stays possible
        picks.append(int(out.argmax()))
    return picks


SCORES = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))


def test_sampling_is_reproducible_for_a_seed() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    first = sample(params, SCORES)
    assert sample(params, SCORES) == first
    assert sample(SamplingParams(temperature=1.0, seed=4321), SCORES) != first
    assert len(set(first)) > 1


def test_top_p_keeps_only_the_nucleus() -> None:
    scores = torch.tensor([[5.0, 4.0, -5.0, -5.0, -5.0]])  # tokens 0 and 1 hold ~all the mass
    picks = sample(SamplingParams(temperature=1.0, top_p=0.5, seed=0), scores, steps=30)
    assert set(picks) == {0}
    picks = sample(SamplingParams(temperature=1.0, top_p=0.99, seed=0), scores, steps=50)
    assert set(picks) == {0, 1}


TEXT = {5: "Hello", 6: " wor", 7: "ld", 8: "!", 2: ""}


def run_progress(
    tokens: list[int], stops: list[str], cancel_after: int | None = None
) -> tuple[list[bool], list[str], Progress]:
    """Feed ``tokens`` as generate would (the growing sequence after a 3-token prompt)."""
    cancelled, sent = threading.Event(), []
    progress = Progress(
        3, lambda ids: "".join(TEXT[i] for i in ids), stops, cancelled, lambda piece: sent.append(piece.text)
    )
    verdicts, ids = [], [1, 1, 1]
    for n, token in enumerate(tokens, 1):
        ids.append(token)
        verdicts.append(bool(progress(torch.tensor([ids]), torch.zeros(1, 9))[0]))  # type: ignore[arg-type]
        if cancel_after == n:
            cancelled.set()
    progress.finish()
    return verdicts, sent, progress


def test_progress_streams_text_and_stops_on_the_token_that_completes_a_stop_string() -> None:
    verdicts, sent, progress = run_progress([5, 6, 7, 8], ["world"])
    assert verdicts == [False, False, True, True]
    assert "".join(sent) == "Hello " and progress.scanner.stopped
    assert progress.tokens[:3] == [5, 6, 7]


def test_progress_without_stops_passes_everything() -> None:
    verdicts, sent, progress = run_progress([5, 6, 7, 2], [])
    assert verdicts == [False] * 4 and sent == ["Hello", " wor", "ld"] and len(progress.tokens) == 4


def test_a_cancelled_request_stops_at_the_next_token() -> None:
    verdicts, sent, _ = run_progress([5, 6, 7], [], cancel_after=1)
    assert verdicts == [False, True, True]


def test_progress_attaches_each_tokens_log_probability_to_the_text_it_completes() -> None:
    """A token whose text is held back (a possible stop-string prefix) is scored with the piece that
    finally sends it; the recorder's log-probabilities are the model's, before sampling."""
    cancelled, pieces = threading.Event(), []
    recorder = LogprobRecorder()
    progress = Progress(
        3, lambda ids: "".join(TEXT[i] for i in ids), [" worx"], cancelled, pieces.append,
        recorder=recorder, top_logprobs=2, token_text=lambda ids: [f"t{i}" for i in ids],
    )  # fmt: skip
    logits = torch.arange(9, dtype=torch.float32).unsqueeze(0)
    ids = [1, 1, 1]
    for token in (5, 6, 7):
        assert recorder(torch.tensor([ids]), logits) is logits  # type: ignore[arg-type]
        ids.append(token)
        progress(torch.tensor([ids]), logits)  # type: ignore[arg-type]
    progress.finish()
    expected = torch.log_softmax(logits[0], dim=-1)
    assert [p.text for p in pieces] == ["Hello", " world"]  # " wor" waited: it could start " worx"
    assert [[s.token_id for s in p.logprobs] for p in pieces] == [[5], [6, 7]]
    scored = pieces[1].logprobs[0]
    assert scored.token == "t6" and scored.logprob == pytest.approx(float(expected[6]))
    assert [t for t, _ in scored.top] == ["t8", "t7"]
    assert scored.top[0][1] == pytest.approx(float(expected[8]))
