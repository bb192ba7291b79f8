"""What every client-side model shares: a transformers model of the family whose decoder layers
are remote, the local weights (embeddings, positions, final norm), trainable prompts for prompt
tuning, and the pass of hidden states through the swarm.

The base model also answers to Petals' names (``transformer``, ``word_embeddings``, ``h``, ``ln_f``,
``word_embeddings_layernorm``), and its decoder layers are the remote blocks (``RemoteSequential``),
so Petals code runs with only its import changed.

``tuning_mode="ptune"`` prepends ``pre_seq_len`` trainable embeddings to every input;
``"deep_ptune"`` also adds a trainable prompt to those positions before every block (the servers
add them; P-tuning v2, as Petals does). Everything else stays frozen."""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from corolla.client.manager import SequenceManager
from corolla.client.sequential import RemoteSequential, remote_sequential
from corolla.client.session import InferenceSession
from corolla.config import ClientConfig, default_cache_dir
from corolla.errors import ConfigError, ModelNotFound
from corolla.models.families import Family, family_for
from corolla.models.resolve import default_dht_prefix, resolve_model
from corolla.models.span import span_config
from corolla.runtime.cpu_kernels import use_onednn_linears
from corolla.runtime.loader import layer_pattern, load_into, read_tensors, weight_files

TUNING_MODES = (None, "ptune", "deep_ptune")
Fetch = Callable[[list[str]], object]
M = TypeVar("M", bound="RemoteModel")


@dataclass(frozen=True)
class Tuning:
    """How a client model is tuned: ``mode`` None, "ptune" or "deep_ptune"; ``pre_seq_len`` prompt
    positions; ``active_adapter`` a LoRA adapter served by the swarm (None: base weights)."""

    mode: str | None = None
    pre_seq_len: int = 0
    active_adapter: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in TUNING_MODES:
            raise ConfigError(f"tuning_mode {self.mode!r} is unknown; use None, 'ptune' or 'deep_ptune'")
        if self.mode is not None and self.pre_seq_len <= 0:
            raise ConfigError(f"tuning_mode {self.mode!r} needs pre_seq_len > 0")


class RemoteModel(PreTrainedModel):
    """Mixed in front of a family's transformers class; see ``from_swarm``."""

    family: Family
    manager: SequenceManager
    tuning: Tuning

    @classmethod
    def from_swarm(
        cls: type[M], model_dir: Path, config: PretrainedConfig, manager: SequenceManager, tuning: Tuning,
        fetch: Fetch | None = None,
    ) -> M:  # fmt: skip
        """``fetch`` brings in checkpoint tensors first (a hub model held in part)."""
        with init_empty_weights(include_buffers=False):
            model = cls(span_config(config, 0, 0))  # no decoder layers: they are remote
        model.config = config
        model._load_local_weights(model_dir, fetch)
        model.manager, model.tuning = manager, tuning
        model._threads = threading.local()  # sessions are per thread: threads may generate concurrently
        model._use_petals_names(RemoteSequential(manager, adapter=tuning.active_adapter))
        model.eval().requires_grad_(False)
        use_onednn_linears(model)  # the LM head: faster per token on CPU, autograd unchanged
        model._add_prompts()
        return model

    @property
    def transformer(self) -> nn.Module:
        """The base model under Petals' name: ``transformer`` already for BLOOM, Falcon and GPT-2;
        ``model`` for the Llama-like families (Petals' Llama answers to both)."""
        return self._modules[self.family.body]

    def _use_petals_names(self, blocks: RemoteSequential) -> None:
        """Put the remote blocks where the family keeps its decoder layers (``transformer.h``,
        ``model.layers``) and give the base model Petals' names (``petals_body_class``)."""
        self.family.set_layers(self, blocks)
        body = self.transformer
        body.__class__ = petals_body_class(type(body), self.family)

    def _load_local_weights(self, model_dir: Path, fetch: Fetch | None = None) -> None:
        """Every tensor of the checkpoint outside the decoder layers (embeddings, positions, norms,
        the LM head), through transformers' own weight conversions. Heads the checkpoint lacks
        (a classifier's ``score``) are initialised here, to be trained locally."""
        files = weight_files(model_dir)
        pattern = layer_pattern(self.family)
        local = {name for name, _ in self.named_parameters()} | {name for name, _ in self.named_buffers()}
        names: dict[str, str] = {}
        for name in files:
            if pattern.match(name) or name.startswith("lm_head.") and not hasattr(self, "lm_head"):
                continue
            prefixed = f"{self.family.body}.{name}"
            names[name] = prefixed if name not in local and prefixed in local else name
        if fetch is not None:
            fetch(list(names))
        tensors = read_tensors(files, list(names))
        renamed = {names[k]: v for k, v in tensors.items()}
        load_into(self, renamed, dtype=torch.float32, device=torch.device("cpu"))
        if hasattr(self, "lm_head") and (
            getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in names.values()
        ):
            self.lm_head.weight = self.family.embeddings(self).weight
        self._init_new_heads()
        still_meta = [name for name, p in self.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise ModelNotFound(
                f"checkpoint in {model_dir} lacks {', '.join(still_meta[:3])}; re-convert or re-download it"
            )

    def _init_new_heads(self) -> None:
        """Materialise heads that no checkpoint holds (overridden by the classifier)."""

    # --- prompts ------------------------------------------------------------------------------

    def _add_prompts(self) -> None:
        mode, length = self.tuning.mode, self.tuning.pre_seq_len
        if mode is None:
            return
        hidden = self.config.hidden_size
        std = float(getattr(self.config, "initializer_range", 0.02) or 0.02)
        self.prompt_embeddings = nn.Embedding(length, hidden)
        nn.init.normal_(self.prompt_embeddings.weight, std=std)
        if mode == "deep_ptune":
            self.intermediate_prompt_embeddings = nn.Embedding(length, self.manager.num_blocks * hidden)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def get_prompt(self, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prompt embeddings [batch, prefix, hidden], deep prompts [blocks, batch, prefix, hidden]);
        None where the tuning mode has none."""
        if self.tuning.mode is None:
            return None, None
        shallow = self.prompt_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        if self.tuning.mode != "deep_ptune":
            return shallow, None
        length, hidden = self.tuning.pre_seq_len, self.config.hidden_size
        deep = self.intermediate_prompt_embeddings.weight.view(length, self.manager.num_blocks, hidden)
        return shallow, deep.permute(1, 0, 2).unsqueeze(1).expand(-1, batch_size, -1, -1)

    # --- the remote pass ----------------------------------------------------------------------

    def remote_hidden(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        session: InferenceSession | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states of the input positions: embeddings (plus the prompt, on a
        session's first step) through every remote block. Differentiable when autograd needs it."""
        if inputs_embeds is None:
            inputs_embeds = self.family.embeddings(self)(input_ids)
        past = session.position if session is not None else 0
        shallow, deep = (None, None)
        if self.tuning.mode is not None and past == 0:
            shallow, deep = self.get_prompt(inputs_embeds.shape[0])
        prefix = 0
        if shallow is not None:
            inputs_embeds = torch.cat([shallow.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            prefix = shallow.shape[1]
        hidden = self.family.first_hidden(self, inputs_embeds, past)
        adapter = self.tuning.active_adapter
        if session is not None:
            if prefix:
                session.prefix_length = prefix
            out = session.step(hidden, prompts=deep)
        else:
            out = remote_sequential(self.manager, hidden, prompts=deep, adapter=adapter)
        return self.family.final_norm(self)(out.to(inputs_embeds.dtype)[:, prefix:])


@functools.cache
def petals_body_class(base: type[nn.Module], family: Family) -> type[nn.Module]:
    """``base``, a family's base model class, with Petals' names for its modules where transformers
    names them otherwise: ``word_embeddings``, ``h`` (the remote blocks), ``ln_f``, and an identity
    ``word_embeddings_layernorm`` where the family has no embedding norm (as Petals' Llama, Mixtral and
    Falcon have). Properties, so the state dict keeps one name per tensor. GPT-2, which Petals does
    not serve, keeps transformers' names (its ``wte`` alone is not what enters block 0)."""
    if family.style == "gpt2":
        return base
    names = {"word_embeddings": family.embed_path, "h": family.layers_path, "ln_f": family.norm_path}
    aliases: dict[str, property] = {}
    for alias, path in names.items():
        own = path.removeprefix(f"{family.body}.")
        if own != alias:
            aliases[alias] = property(operator.attrgetter(own))
    if family.style != "bloom":
        aliases["word_embeddings_layernorm"] = property(lambda _: nn.Identity())
    return type(f"Distributed{base.__name__}", (base,), aliases) if aliases else base


def build(
    class_for: Callable[[Family], type[M]],
    model_name_or_path: str,
    *,
    initial_peers: list[str] | tuple[str, ...] = (),
    dht_prefix: str | None = None,
    cache_dir: str | None = None,
    client_config: ClientConfig | None = None,
    dht: Any = None,
    tuning_mode: str | None = None,
    pre_seq_len: int = 0,
    active_adapter: str | None = None,
    swarm_key: str | None = None,
    identity_path: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    **config_overrides: Any,
) -> M:
    """Resolve the model, connect to its swarm and build ``class_for(family)``'s model. ``swarm_key``:
    the key file of a closed swarm; ``identity_path``: a file keeping this client's peer id (servers'
    ``--allowed_peers`` list peer ids); both override ``client_config``'s. ``revision``/``token``: a
    hub model's branch, tag or commit and an access token; of a hub model only the tensors kept
    here (embeddings, final norm, LM head) are fetched."""
    tuning = Tuning(tuning_mode, pre_seq_len, active_adapter)
    if "torch_dtype" in config_overrides:  # Petals' (and transformers 4's) name; transformers 5 warns on it
        config_overrides.setdefault("dtype", config_overrides.pop("torch_dtype"))
    resolved = resolve_model(
        model_name_or_path, cache_dir or default_cache_dir(), revision=revision, token=token
    )
    config = AutoConfig.from_pretrained(resolved.path, **config_overrides)
    family = family_for(config)
    prefix = dht_prefix or default_dht_prefix(resolved.name, revision)
    client_config = client_config or ClientConfig()
    if initial_peers:
        client_config = replace(client_config, initial_peers=tuple(initial_peers))
    if swarm_key is not None:
        client_config = replace(client_config, swarm_key=str(swarm_key))
    if identity_path is not None:
        client_config = replace(client_config, identity_path=str(identity_path))
    manager = SequenceManager(
        client_config, prefix, config.num_hidden_layers, dht=dht, adapter=active_adapter
    )
    try:
        fetch = functools.partial(resolved.fetch, what="embeddings, final norm and LM head")
        return class_for(family).from_swarm(resolved.path, config, manager, tuning, fetch)
    except BaseException:
        manager.shutdown()
        raise
