"""A transformers model whose decoder blocks live in the swarm.

Only the embeddings, the final norm and the LM head are loaded locally; ``forward`` sends
hidden states through a chain of servers. ``generate()`` works as usual (greedy, sampling,
streamers); inside an inference session each step sends only the new tokens."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.client.manager import SequenceManager
from corolla.client.remote import Fetch, RemoteModel, Tuning, build
from corolla.client.session import InferenceSession
from corolla.client.threads import while_generating
from corolla.errors import CorollaError
from corolla.models.families import Family

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(RemoteModel, GenerationMixin):
    """The client half of a causal LM: mixed in front of the family's transformers class (see
    ``distributed_class``), it keeps the embeddings, the final norm and the LM head, and sends
    hidden states through the swarm where the model would run its decoder layers."""

    @classmethod
    def from_swarm(
        cls, model_dir: Path, config: PretrainedConfig, manager: SequenceManager,
        tuning: Tuning | None = None, fetch: Fetch | None = None,
    ) -> DistributedModelForCausalLM:  # fmt: skip
        model = super().from_swarm(model_dir, config, manager, tuning or Tuning(), fetch)
        if (model_dir / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        return model

    # --- sessions -----------------------------------------------------------------------------

    @property
    def _active_session(self) -> InferenceSession | None:
        """The session ``forward`` steps (set by ``generate`` in this thread)."""
        return getattr(self._threads, "active", None)

    @_active_session.setter
    def _active_session(self, session: InferenceSession | None) -> None:
        self._threads.active = session

    @property
    def _default_session(self) -> InferenceSession | None:
        """The session opened by ``inference_session()`` in this thread."""
        return getattr(self._threads, "default", None)

    @_default_session.setter
    def _default_session(self, session: InferenceSession | None) -> None:
        self._threads.default = session

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[InferenceSession]:
        """``with model.inference_session(max_length=N) as s:`` — servers keep the KV cache; inside the
        block, ``generate`` continues this session unless given another one. ``batch_size`` defaults to
        the first step's, as in Petals."""
        session = self._new_session(max_length, batch_size)
        previous, self._default_session = self._default_session, session
        try:
            yield session
        finally:
            self._default_session = previous
            session.close()

    @contextlib.contextmanager
    def _using(self, session: InferenceSession) -> Iterator[None]:
        previous, self._active_session = self._active_session, session
        try:
            yield
        finally:
            self._active_session = previous

    # --- transformers hooks -------------------------------------------------------------------

    def generate(
        self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None, **kwargs: Any
    ) -> Any:
        """``transformers`` generate; with ``session`` the prompt continues that session's history
        and the servers keep the cache. Returns ``inputs`` + new tokens, as transformers does.
        ``generate(None)`` in a session continues it with no new prompt tokens, as in Petals (then
        only the new tokens are returned)."""
        session = session or self._default_session
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            if session is None or session.token_ids is None:
                raise CorollaError("generate(None) continues a session that has generated; give input_ids")
            inputs = session.token_ids[:, :0]
        kwargs.pop("attention_mask", None)  # no padding support: every token is attended
        if session is None:
            max_length = self._max_length(inputs, kwargs)
            with self._new_session(max_length, inputs.shape[0]) as temporary:
                return self.generate(inputs, session=temporary, **kwargs)
        history = session.token_ids if session.token_ids is not None else inputs[:, :0]
        full = torch.cat([history, inputs], dim=1)
        with self._using(session), while_generating(self.manager.server_here):
            out = super().generate(full, attention_mask=torch.ones_like(full), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        session.token_ids = sequences
        if isinstance(out, torch.Tensor):
            return sequences[:, history.shape[1] :]
        out.sequences = sequences[:, history.shape[1] :]
        return out

    def _new_session(self, max_length: int, batch_size: int | None) -> InferenceSession:
        """A session with room for the prompt positions of prompt tuning, on the tuned adapter."""
        return InferenceSession(
            self.manager, max_length + self.tuning.pre_seq_len, batch_size, adapter=self.tuning.active_adapter
        )

    def _max_length(self, inputs: torch.Tensor, kwargs: dict[str, Any]) -> int:
        if kwargs.get("max_new_tokens") is not None:
            return inputs.shape[1] + int(kwargs["max_new_tokens"])
        if kwargs.get("max_length") is not None:
            return int(kwargs["max_length"])
        config = kwargs.get("generation_config") or self.generation_config
        if config.max_new_tokens is not None:
            return inputs.shape[1] + config.max_new_tokens
        return max(int(config.max_length or 20), inputs.shape[1] + 1)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        session = self._active_session
        start = session.position - session.prefix_length if session is not None else 0
        inputs: dict[str, Any] = {"input_ids": input_ids[:, start:], "use_cache": False}
        if kwargs.get("logits_to_keep") is not None:  # generate asks for the last position's logits only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        hidden = self.remote_hidden(input_ids, inputs_embeds, self._active_session)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)


@functools.cache
def distributed_class(family: Family) -> type[DistributedModelForCausalLM]:
    """``Distributed<Architecture>``: the family's transformers causal-LM class with remote blocks."""
    base = getattr(transformers, family.architecture)
    return type(f"Distributed{family.architecture}", (DistributedModelForCausalLM, base), {"family": family})


class AutoDistributedModelForCausalLM:
    """``AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])``; also
    ``tuning_mode="ptune"|"deep_ptune"`` with ``pre_seq_len``, and ``active_adapter=NAME``."""

    @staticmethod
    def from_pretrained(model_name_or_path: str, **kwargs: Any) -> DistributedModelForCausalLM:
        return build(distributed_class, model_name_or_path, **kwargs)
