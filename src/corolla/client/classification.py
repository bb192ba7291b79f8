"""Sequence classification over the swarm: the family's ``…ForSequenceClassification`` class with
remote decoder blocks and a classification head (``score``) trained locally."""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from corolla.client.remote import RemoteModel, build
from corolla.models.families import Family


class DistributedModelForSequenceClassification(RemoteModel):
    """Pools the last non-padding position's final hidden state into ``config.num_labels`` scores."""

    def _init_new_heads(self) -> None:
        if self.score.weight.device.type == "meta":
            std = float(getattr(self.config, "initializer_range", 0.02) or 0.02)
            self.score = nn.Linear(self.config.hidden_size, self.config.num_labels, bias=False)
            nn.init.normal_(self.score.weight, std=std)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        hidden = self.remote_hidden(input_ids, inputs_embeds)
        logits = self.score(hidden)
        pooled = logits[torch.arange(logits.shape[0]), self._last_positions(input_ids, logits.shape[1])]
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(pooled.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(pooled, labels)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)

    def _last_positions(self, input_ids: torch.Tensor | None, length: int) -> torch.Tensor:
        """The last position before right padding (``config.pad_token_id``), per sequence."""
        pad = self.config.pad_token_id
        if input_ids is None or pad is None:
            batch = 1 if input_ids is None else input_ids.shape[0]
            return torch.full((batch,), length - 1, dtype=torch.long)
        non_pad = (input_ids != pad).long()
        positions = torch.arange(input_ids.shape[1])
        return (non_pad * positions).argmax(dim=-1)


@functools.cache
def classification_class(family: Family) -> type[DistributedModelForSequenceClassification]:
    """``Distributed<Family>ForSequenceClassification`` with remote blocks."""
    base = getattr(transformers, family.classifier)
    name = f"Distributed{family.classifier}"
    return type(name, (DistributedModelForSequenceClassification, base), {"family": family})


class AutoDistributedModelForSequenceClassification:
    """``AutoDistributedModelForSequenceClassification.from_pretrained(MODEL, initial_peers=[...],
    num_labels=2)``; prompt tuning (``tuning_mode``) and ``active_adapter`` work as for causal LMs."""

    @staticmethod
    def from_pretrained(model_name_or_path: str, **kwargs: Any) -> DistributedModelForSequenceClassification:
        return build(classification_class, model_name_or_path, **kwargs)
