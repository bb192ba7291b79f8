"""A transformers model whose decoder blocks live in the swarm.

Only the embeddings, the final norm and the LM head are loaded locally; ``forward`` sends
hidden states through a chain of servers. ``generate()`` works as usual (greedy, sampling,
streamers); inside an inference session each step sends only the new tokens."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.client.manager import SequenceManager
from corolla.client.sequential import remote_forward
from corolla.client.session import InferenceSession
from corolla.config import ClientConfig, default_cache_dir
from corolla.errors import ModelNotFound
from corolla.models.families import Family, family_for
from corolla.models.resolve import default_dht_prefix, resolve_model
from corolla.models.span import span_config
from corolla.runtime.loader import layer_pattern, load_into, read_tensors, weight_files

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """The client half of a causal LM: mixed in front of the family's transformers class (see
    ``distributed_class``), it keeps the embeddings, the final norm and the LM head, and sends
    hidden states through the swarm where the model would run its decoder layers."""

    family: Family
    manager: SequenceManager

    @classmethod
    def from_swarm(
        cls, model_dir: Path, config: PretrainedConfig, manager: SequenceManager
    ) -> DistributedModelForCausalLM:
        with init_empty_weights(include_buffers=False):
            model = cls(span_config(config, 0, 0))  # no decoder layers: they are remote
        model.config = config
        model._load_local_weights(model_dir)
        if (model_dir / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        model.manager = manager
        model._threads = threading.local()  # sessions are per thread: threads may generate concurrently
        return model.eval().requires_grad_(False)

    def _load_local_weights(self, model_dir: Path) -> None:
        """Every tensor of the checkpoint outside the decoder layers (embeddings, positions, norms,
        the LM head), through transformers' own weight conversions."""
        files = weight_files(model_dir)
        pattern = layer_pattern(self.family)
        local = {name for name, _ in self.named_parameters()} | {name for name, _ in self.named_buffers()}
        names: dict[str, str] = {}
        for name in files:
            if pattern.match(name):
                continue
            prefixed = f"{self.family.body}.{name}"
            names[name] = prefixed if name not in local and prefixed in local else name
        tensors = read_tensors(files, list(names))
        renamed = {names[k]: v for k, v in tensors.items()}
        load_into(self, renamed, dtype=torch.float32, device=torch.device("cpu"))
        if getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in names.values():
            self.lm_head.weight = self.family.embeddings(self).weight
        still_meta = [name for name, p in self.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise ModelNotFound(
                f"checkpoint in {model_dir} lacks {', '.join(still_meta[:3])}; re-convert or re-download it"
            )

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
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """``with model.inference_session(max_length=N) as s:`` — servers keep the KV cache; inside the
        block, ``generate`` continues this session unless given another one."""
        session = InferenceSession(self.manager, max_length, batch_size)
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
        and the servers keep the cache. Returns ``inputs`` + new tokens, as transformers does."""
        session = session or self._default_session
        if inputs is None:
            inputs = kwargs.pop("input_ids")
        kwargs.pop("attention_mask", None)  # no padding support: every token is attended
        if session is None:
            max_length = self._max_length(inputs, kwargs)
            with InferenceSession(self.manager, max_length, inputs.shape[0]) as temporary:
                return self.generate(inputs, session=temporary, **kwargs)
        history = session.token_ids if session.token_ids is not None else inputs[:, :0]
        full = torch.cat([history, inputs], dim=1)
        with self._using(session):
            out = super().generate(full, attention_mask=torch.ones_like(full), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        session.token_ids = sequences
        if isinstance(out, torch.Tensor):
            return sequences[:, history.shape[1] :]
        out.sequences = sequences[:, history.shape[1] :]
        return out

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
        start = session.position if session is not None else 0
        return {"input_ids": input_ids[:, start:], "use_cache": False}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.family.embeddings(self)(input_ids)
        session = self._active_session
        hidden = self.family.first_hidden(self, inputs_embeds, session.position if session else 0)
        hidden = session.step(hidden) if session is not None else remote_forward(self.manager, hidden)
        hidden = self.family.final_norm(self)(hidden.to(inputs_embeds.dtype))
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
    """``AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])``."""

    @staticmethod
    def from_pretrained(
        model_name_or_path: str,
        *,
        initial_peers: list[str] | tuple[str, ...] = (),
        dht_prefix: str | None = None,
        cache_dir: str | None = None,
        client_config: ClientConfig | None = None,
        dht: Any = None,
    ) -> DistributedModelForCausalLM:
        resolved = resolve_model(model_name_or_path, cache_dir or default_cache_dir())
        config = AutoConfig.from_pretrained(resolved.path)
        family = family_for(config)
        prefix = dht_prefix or default_dht_prefix(resolved.name)
        client_config = client_config or ClientConfig()
        if initial_peers:
            client_config = replace(client_config, initial_peers=tuple(initial_peers))
        manager = SequenceManager(client_config, prefix, config.num_hidden_layers, dht=dht)
        return distributed_class(family).from_swarm(resolved.path, config, manager)
