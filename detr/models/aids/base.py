"""The interface of a training aid: extra queries, outputs and loss terms in training only.

A training aid (Group DETR's query groups, DN-DETR's denoising queries, the dense head) adds
work to training and nothing to inference: :class:`~detr.models.detr.DETR` calls its hooks
only in training mode, and its parameters are *training-only* (the official checkpoints have
none, inference never reads them). The model registers the aid's child modules on itself
under their own names (``group_query_embed``, ``denoiser``, ``dense_embed`` ...), so the
state-dict keys are those of the checkpoints written before the aids had this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Queries:
    """The decoder's queries in one forward pass.

    ``pos`` [Q, d] (shared by the batch) or [B, Q, d]: the query positions (the learned
    object queries, then the aids' extra ones); ``content`` None (zeros, as in the paper) or
    [B, Q, d]; ``attend`` None (all to all), [Q, Q] or [B, 1, Q, Q] bool, True where a query
    may attend to a key in the decoder's self-attention; ``num_object``: the first
    ``num_object`` queries are object queries (matched to the targets), the rest belong to
    aids; ``state``: per aid name, what its :meth:`TrainingAid.outputs` needs from this pass.
    """

    pos: Tensor
    content: Tensor | None = None
    attend: Tensor | None = None
    num_object: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def with_state(self, name: str, value: Any, **changes) -> Queries:
        return replace(self, state={**self.state, name: value}, **changes)


# Decoder states [L, B, Q', d] -> DETR's output dict (``pred_logits``, ``pred_boxes``, aux).
Heads = Callable[[Tensor], dict]


class TrainingAid(nn.Module):
    """Base class of the training aids. Subclasses set:

    ``name``: the key of the aid's section in ``model.aids`` (and of its outputs);
    ``parts``: the names of the child modules it may have: the model registers them on itself,
    they are its training-only state-dict prefixes (``name.``);
    ``class_sized``: the prefixes among them sized by the number of classes (re-initialised
    when fine-tuning to other classes).
    """

    name: str = ""
    parts: tuple[str, ...] = ()
    class_sized: tuple[str, ...] = ()

    @classmethod
    def training_only_prefixes(cls) -> tuple[str, ...]:
        return tuple(f"{part}." for part in cls.parts)

    def extend_queries(self, queries: Queries, targets: Sequence[dict] | None) -> Queries:
        """Add queries (or an attention rule) to the decoder's; default: none."""
        return queries

    def outputs(self, queries: Queries, hs: Tensor, memory: Tensor, mask: Tensor,
                heads: Heads) -> dict:
        """Training outputs added to DETR's dict, from the decoder states ``hs`` [L, B, Q, d]
        of all queries, the encoder ``memory`` [B, d, h, w] and its padding ``mask`` [B, h, w]
        (multi-scale features: a list of both, one per level, finest first). Default: none."""
        return {}

    def split(self, layer: dict, outputs: dict) -> list[dict]:
        """One decoder layer's object-query outputs -> the query sets that the Hungarian
        matching matches to the targets each on its own. Default: one set."""
        return [layer]

    def losses(self, outputs: dict, targets: Sequence[dict], *, num_boxes: Tensor,
               empty_weight: Tensor) -> dict[str, Tensor]:
        """The aid's loss terms (scalar tensors; names ending in ``_<layer>`` for decoder
        layers but the last). ``num_boxes``: the matched loss's normaliser; ``empty_weight``
        [C+1]: the class weights of the cross-entropy ("no object" = eos_coef). Default: none."""
        return {}

    def loss_weights(self, matched: dict[str, float]) -> dict[str, float]:
        """Weight of each loss term (by its name without the layer suffix), given the matched
        terms' weights ``loss_ce``, ``loss_bbox``, ``loss_giou``. Default: none."""
        return {}


def block_diagonal(groups: int, size: int, device: torch.device) -> Tensor:
    """[G*n, G*n] bool: True where both indices are in the same group of ``size``: the
    attention rule of query groups that must not see each other."""
    group = torch.arange(groups * size, device=device) // size
    return group[:, None] == group[None, :]
