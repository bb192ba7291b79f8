"""LoRA adapters in the PEFT format, served for a span of decoder blocks.

An adapter is a directory as ``peft_model.save_pretrained(dir)`` writes it: ``adapter_config.json`` (a
``peft.LoraConfig``) and ``adapter_model.safetensors``. A server loads the adapters it was started with into
its span once (:func:`load_adapters`); each request then names the adapter it computes with, or none
(:func:`using_adapter`).

Names. What clients ask for is the adapter's name as the server was given it: a hub repo id as typed
(``"user/llama-lora"``), or a local directory's path as typed (``"./my-lora"``, not made absolute), see
:func:`resolve_adapter`. Inside the layers each adapter gets a peft adapter name of its own
(``corolla_0``, ``corolla_1``, ...), since peft's names cannot hold the dots and slashes of paths.

Layers. The LoRA layers are injected by peft itself (``peft.inject_adapter_in_model``), into a view of
the span whose module names are those of the full model: ``model.layers.{N}.self_attn.q_proj`` with the
absolute block index ``N`` (``transformer.h.{N}.attn.c_attn`` for the ``transformer.h`` families). The
view shares the span's layer objects, so peft's module replacement changes the span itself, and
everything in the config that refers to module names or block indices (``target_modules`` as a list or a
regex, ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``,
``exclude_modules``, ``target_parameters``) matches exactly as it did on the full model. The weights are
read from the safetensors file for the hosted blocks only, keyed by the same absolute names, and copied
into the injected LoRA weights under the names peft's ``save_pretrained`` gives them (what
``peft.set_peft_model_state_dict`` does, see :func:`_assign_weights` for why not that function itself); a
tensor the span does not take, or a LoRA weight of the span that the file lacks, is an error. An adapter
that changes nothing in the hosted blocks (``layers_to_transform`` elsewhere) is still served: it
computes with the base weights here.

Refused (``ConfigError``): adapters with weights outside the decoder blocks (``lm_head``,
``embed_tokens``), ``modules_to_save``, ``trainable_token_indices``, trained biases (``bias`` other than
``"none"``) and ``layer_replication``, which all change more than LoRA weights of the blocks; and
tensor-parallel spans (the LoRA weights would need the same sharding as the projections they adapt).
Non-LoRA PEFT types are not adapters here (``ModelNotFound`` from :func:`resolve_adapter`). Adapters
trained with transformers 4 on Mixtral's per-expert ``w1``/``w2``/``w3`` are not converted to transformers
5's fused experts (peft does that only for a whole transformers model): attention LoRA and
``target_parameters`` on the fused experts work.

Quantised spans (``--quant_type int8`` / ``nf4``): peft wraps bitsandbytes ``Linear8bitLt`` / ``Linear4bit``
layers with its LoRA layers for bitsandbytes (``peft.tuners.lora.bnb``); the base weights stay quantised
and the LoRA path computes in the adapter's dtype, so the result is what peft gives on a model quantised
the same way.

Switching. Every adapter is loaded disabled. :func:`using_adapter` sets, on every peft ``LoraLayer`` of the
span, the active adapter and whether adapters are enabled (a layer that does not have the requested
adapter computes with its base weights), and restores the previous state on exit. That is two attribute
writes per adapted module, with no parameter touched, so it is cheap enough to do per request.

Servers never train: the base weights and every LoRA weight are frozen (``requires_grad`` False) and the
LoRA layers are in eval mode (no dropout); gradients still flow to the inputs for clients' backward passes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from corolla.errors import BadRequest, ConfigError, ModelNotFound
from corolla.models.families import Family
from corolla.models.resolve import looks_like_repo_id
from corolla.runtime.loader import layer_pattern
from corolla.runtime.tensor_parallel import ShardedAttention, ShardedMLP

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from corolla.models.span import SpanModel

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's own module names
_INTERNAL_PREFIX = "corolla_"  # peft adapter names inside the layers: corolla_0, corolla_1, ...
_STATE_ATTR = "_corolla_adapters"  # where a span keeps its adapters' state (a plain attribute)


@dataclass
class _Adapters:
    """The adapters loaded into one span, and which one is active."""

    internal: dict[str, str] = field(default_factory=dict)  # client-facing name -> peft adapter name
    layers: list[LoraLayer] = field(default_factory=list)  # every peft LoRA layer in the span
    present: dict[str, list[bool]] = field(default_factory=dict)  # name -> has it, per entry of layers
    active: str | None = None  # None: base weights only


# ---------------------------------------------------------------- finding adapters


def resolve_adapter(path_or_repo: str, cache_dir: str) -> tuple[str, Path]:
    """The adapter's name and its local PEFT directory, without any network access.

    ``path_or_repo`` is an existing local directory (its name is ``path_or_repo`` exactly as given: clients
    must ask for that same string), else a hub repo id found in the local Hugging Face hub cache
    (``HF_HUB_CACHE`` / ``HF_HOME``, as for models; its name is the repo id). ``cache_dir`` is corolla's
    cache directory, taken for symmetry with ``resolve_model``: adapters are used as they are, nothing is
    converted or written there. Raises ``ModelNotFound`` when neither is found or the directory is not a
    PEFT LoRA adapter in safetensors format.
    """
    del cache_dir  # see the docstring
    path = Path(path_or_repo).expanduser()
    if path.exists():
        check_adapter_dir(path_or_repo, path)
        return path_or_repo, path.resolve()
    if looks_like_repo_id(path_or_repo):
        snapshot = _cached_snapshot(path_or_repo)
        if snapshot is not None:
            check_adapter_dir(path_or_repo, snapshot)
            return path_or_repo, snapshot
    fetch = path_or_repo if looks_like_repo_id(path_or_repo) else "OWNER/NAME"
    raise ModelNotFound(
        f"adapter {path_or_repo!r} is neither a local directory nor in the Hugging Face hub cache; pass a "
        f"directory with {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (as peft's save_pretrained writes), or fetch "
        f"it first with: hf download {fetch}"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    from corolla.models.resolve import _hub_cache_dir

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hub_cache_dir()))
    except Exception:  # not cached, partly cached, unreadable: all mean "not here"
        return None


def check_adapter_dir(name: str, path: Path) -> None:
    """Raise ``ModelNotFound`` unless ``path`` holds a PEFT LoRA adapter with safetensors weights."""
    if not path.is_dir():
        raise ModelNotFound(
            f"adapter {name!r}: {path} is not a directory; pass a PEFT adapter directory "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) or a hub repo id"
        )
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelNotFound(
            f"adapter {name!r}: {path} has no {ADAPTER_CONFIG}; pass a directory written by "
            "peft_model.save_pretrained(dir)"
        )
    try:
        peft_type = json.loads(config_file.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelNotFound(
            f"adapter {name!r}: cannot read {config_file} ({type(error).__name__}: {error}); "
            "re-save the adapter with peft"
        ) from None
    if str(peft_type).upper() != "LORA":
        raise ModelNotFound(
            f"adapter {name!r} is a PEFT {peft_type} adapter; servers load only LoRA adapters, pass one"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelNotFound(
            f"adapter {name!r}: {path} has no {ADAPTER_WEIGHTS}; re-save the adapter in safetensors "
            "format (peft_model.save_pretrained(dir) writes it)"
        )


# ---------------------------------------------------------------- loading


def load_adapters(
    span: SpanModel,
    adapters: Sequence[tuple[str, Path]],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> list[str]:
    """Inject the LoRA ``adapters`` (``(name, directory)`` pairs, as :func:`resolve_adapter` returns them)
    into ``span``'s layers with peft and load their weights for the hosted blocks, in ``dtype`` on
    ``device``. Returns the names loaded, in order. Every adapter starts disabled: the span computes with
    its base weights outside :func:`using_adapter`.

    Raises ``ConfigError`` for an adapter the span cannot serve (see the module docstring) or one given
    twice, and ``ModelNotFound`` for unreadable files. A span whose loading failed must not be served.
    """
    _check_span(span)
    state = _state(span)
    loaded: list[str] = []
    try:
        for name, path in adapters:
            if name in state.internal:
                raise ConfigError(f"adapter {name!r} is given twice; give each adapter once")
            internal = f"{_INTERNAL_PREFIX}{len(state.internal)}"
            _load_one(span, name, path, internal, dtype=dtype, device=device)
            state.internal[name] = internal
            loaded.append(name)
    finally:
        _refresh(span, state)
    return loaded


def _check_span(span: SpanModel) -> None:
    if any(isinstance(m, (ShardedAttention, ShardedMLP)) for m in span.layers.modules()):
        raise ConfigError(
            "--adapters cannot be combined with --tensor_parallel_devices (LoRA weights are not sharded); "
            "serve adapters on one device"
        )


def _load_one(
    span: SpanModel, name: str, path: Path, internal: str, *, dtype: torch.dtype, device: torch.device
) -> None:
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    config = _read_config(name, path)
    tensors = _read_weights(name, path / ADAPTER_WEIGHTS, span.family, span.start, span.end)
    view = _absolute_view(span)
    try:
        inject_adapter_in_model(config, view, adapter_name=internal)
    except NoMatchingPeftModuleError as error:
        if tensors:
            raise ConfigError(
                f"adapter {name!r} has weights for blocks {span.start}-{span.end - 1} but its config "
                f"targets none of their modules ({_first_line(error)}); re-save the adapter with peft"
            ) from None
        logger.info("adapter %s changes nothing in blocks %d-%d", name, span.start, span.end - 1)
        return
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"adapter {name!r} cannot be applied to this model: {_first_line(error)}") from None
    _assign_weights(view, name, internal, tensors, span)
    for layer in _lora_layers(span):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr, None)
            if isinstance(container, nn.Module) and internal in container:
                container.to(device=device, dtype=dtype)
        layer.train(layer.get_base_layer().training)  # the span's mode: no LoRA dropout on a server
    span.layers.requires_grad_(False)
    logger.info("adapter %s loaded into blocks %d-%d", name, span.start, span.end - 1)


def _assign_weights(
    view: nn.Module, name: str, internal: str, tensors: dict[str, torch.Tensor], span: SpanModel
) -> None:
    """Copy the checkpoint ``tensors`` into the LoRA weights of adapter ``internal`` that peft injected.

    The checkpoint name of each weight is peft's own (``_remove_adapter_name_from_state_dict_key``, as
    ``save_pretrained`` uses). This does what ``peft.set_peft_model_state_dict`` does, without its pass over
    the whole model's ``state_dict()``: that would also serialise every base weight, and bitsandbytes'
    ``state_dict()`` of an NF4 layer already repacked for its CPU kernel unpacks it, changing its values.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    params: dict[str, nn.Parameter] = {}
    for module_name, module in view.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or internal not in container:
                continue
            entry = container[internal]
            prefix = f"{module_name}.{attr}.{internal}"
            found = entry.named_parameters(prefix) if isinstance(entry, nn.Module) else [(prefix, entry)]
            for model_key, param in found:
                params[_remove_adapter_name_from_state_dict_key(model_key, internal)] = param
    problems = [f"missing {k}" for k in sorted(set(params) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(params))]
    if problems:
        raise ConfigError(
            f"adapter {name!r}: its weights do not match its config for blocks {span.start}-{span.end - 1} "
            f"({', '.join(problems[:3])}); re-save the adapter with peft"
        )
    mismatched = [k for k, param in params.items() if param.shape != tensors[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError(
            f"adapter {name!r} does not fit this model ({k} has shape {list(tensors[k].shape)}, the model "
            f"needs {list(params[k].shape)}); was it trained for another base model?"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def _read_config(name: str, path: Path) -> LoraConfig:
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelNotFound(
            f"adapter {name!r}: cannot read its LoRA config in {path} ({_first_line(error)}); "
            "re-save the adapter with peft"
        ) from None
    refused = {
        "modules_to_save": config.modules_to_save,
        "trainable_token_indices": getattr(config, "trainable_token_indices", None),
        "layer_replication": getattr(config, "layer_replication", None),
    }
    if config.bias != "none":
        refused["bias"] = config.bias  # trained biases of the base layers: not swappable per request
    for key, value in refused.items():
        if value:
            raise ConfigError(
                f"adapter {name!r} uses {key}={value!r}, which servers cannot serve (they host only LoRA "
                "weights of decoder blocks); use an adapter with LoRA on the decoder layers only"
            )
    config.inference_mode = True  # peft then keeps the injected weights frozen
    return config


def _read_weights(name: str, file: Path, family: Family, start: int, end: int) -> dict[str, torch.Tensor]:
    """The adapter's tensors of blocks ``start..end-1``, keyed by the full model's names
    (``{layers_path}.{N}.…``, absolute ``N``, without peft's ``base_model.model.`` prefix)."""
    pattern = layer_pattern(family)
    try:
        with safe_open(file, framework="pt") as f:
            wanted: dict[str, str] = {}
            outside: list[str] = []
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = pattern.match(key.removeprefix(_PEFT_PREFIX))
                if match is None:
                    outside.append(key.removeprefix(_PEFT_PREFIX))
                elif start <= int(match.group(1)) < end:
                    wanted[key] = f"{family.layers_path}.{match.group(1)}.{match.group(2)}"
            if outside:
                raise ConfigError(
                    f"adapter {name!r} has weights outside the decoder blocks ({', '.join(outside[:3])}); "
                    "servers host only the blocks, so use an adapter whose LoRA targets only layers under "
                    f"{family.layers_path}"
                )
            return {canonical: f.get_tensor(key) for key, canonical in wanted.items()}
    except (OSError, SafetensorError) as error:
        raise ModelNotFound(
            f"adapter {name!r}: cannot read {file} ({type(error).__name__}: {error}); re-download or "
            "re-save the adapter"
        ) from None


class _Container(nn.Module):
    """An empty module holding children under given names."""


def _absolute_view(span: SpanModel) -> nn.Module:
    """A module whose submodules are the span's own layers, named as in the full model
    (``model.layers.{start + i}``), so that peft's name matching sees the full model's names."""
    *outer, last = span.family.layers_path.split(".")
    root = parent = _Container()
    for part in outer:
        child = _Container()
        parent.add_module(part, child)
        parent = child
    blocks = nn.ModuleDict({str(span.start + i): layer for i, layer in enumerate(span.layers)})
    parent.add_module(last, blocks)
    # What transformers sets on a model quantised with bitsandbytes: peft then wraps those layers with its
    # LoRA layers for bitsandbytes (peft.tuners.lora.bnb) instead of its generic ones.
    kinds = {
        type(m).__name__ for m in span.layers.modules() if type(m).__module__.startswith("bitsandbytes.")
    }
    root.is_loaded_in_8bit = "Linear8bitLt" in kinds
    root.is_loaded_in_4bit = "Linear4bit" in kinds
    return root


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- switching


def served_adapters(span: SpanModel) -> tuple[str, ...]:
    """The names of the adapters loaded into ``span``, in loading order."""
    state: _Adapters | None = getattr(span, _STATE_ATTR, None)
    return tuple(state.internal) if state is not None else ()


@contextmanager
def using_adapter(span: SpanModel, name: str | None) -> Iterator[None]:
    """Within this context ``span`` computes with adapter ``name`` only (None: its base weights only);
    the previous choice is restored on exit. Raises ``BadRequest`` for an adapter the span does not serve.
    Not thread-safe: meant for the one thread that computes with the span."""
    state: _Adapters | None = getattr(span, _STATE_ATTR, None)
    if name is not None and (state is None or name not in state.internal):
        served = ", ".join(repr(n) for n in served_adapters(span)) or "none"
        raise BadRequest(f"adapter {name!r} is not served here; served adapters: {served}")
    if state is None or state.active == name:
        yield
        return
    previous = state.active
    _activate(state, name)
    try:
        yield
    finally:
        _activate(state, previous)


def _activate(state: _Adapters, name: str | None) -> None:
    # object.__setattr__: the same as nn.Module.__setattr__ for plain values, without its checks for
    # parameters and submodules (those make it ~10x slower, which adds up over hundreds of layers).
    if name is None:
        for layer in state.layers:
            object.__setattr__(layer, "_disable_adapters", True)
    else:
        internal = state.internal[name]
        for layer, present in zip(state.layers, state.present[name], strict=True):
            object.__setattr__(layer, "_active_adapter", internal)
            object.__setattr__(layer, "_disable_adapters", not present)
    state.active = name


def _state(span: SpanModel) -> _Adapters:
    state: _Adapters | None = getattr(span, _STATE_ATTR, None)
    if state is None:
        state = _Adapters()
        object.__setattr__(span, _STATE_ATTR, state)  # a plain attribute, not a submodule
    return state


def _lora_layers(span: SpanModel) -> list[LoraLayer]:
    from peft.tuners.lora import LoraLayer

    return [m for m in span.layers.modules() if isinstance(m, LoraLayer)]


def _refresh(span: SpanModel, state: _Adapters) -> None:
    """Re-list the span's LoRA layers and which adapters each has; then compute with the base weights."""
    state.layers = _lora_layers(span)
    state.present = {
        name: [internal in _adapter_names(layer) for layer in state.layers]
        for name, internal in state.internal.items()
    }
    _activate(state, None)


def _adapter_names(layer: Any) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(container.keys())
    return names
