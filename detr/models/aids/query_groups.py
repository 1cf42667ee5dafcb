"""Group DETR (Chen et al. 2023) query groups, training only (``model.aids.query_groups``).

In training the decoder gets ``groups`` x num_queries object queries: the learned ones
(``query_embed``, group 0, the only ones inference uses) and ``groups - 1`` more sets
(``group_query_embed``). The groups do not attend to each other, and the criterion matches
each group to the targets on its own and sums their losses: more one-to-one supervision per
step, faster convergence, and a deployed model that is plain DETR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from detr.config import QueryGroupsConfig
from detr.models.aids.base import Queries, TrainingAid, block_diagonal


class QueryGroups(TrainingAid):
    """Adds ``outputs["query_groups"] = G``; DETR's outputs then hold Q = G x num_queries
    queries, group g being queries [g * num_queries, (g + 1) * num_queries)."""

    name = "query_groups"
    parts = ("group_query_embed",)

    def __init__(self, cfg: QueryGroupsConfig, *, dim: int, num_queries: int):
        super().__init__()
        self.groups = cfg.groups
        self.num_queries = num_queries
        self.group_query_embed = nn.Embedding((cfg.groups - 1) * num_queries, dim)

    def extend_queries(self, queries: Queries, targets: Sequence[dict] | None) -> Queries:
        """Append the other groups to the learned object queries (``queries.pos`` [Q, d], no
        other aid's queries yet); each group attends to itself only."""
        pos = torch.cat([queries.pos, self.group_query_embed.weight])
        return queries.with_state(self.name, self.groups, pos=pos, num_object=len(pos),
                                  attend=block_diagonal(self.groups, self.num_queries,
                                                        pos.device))

    def outputs(self, queries, hs, memory, mask, heads) -> dict:
        return {"query_groups": self.groups}

    def split(self, layer: dict, outputs: dict) -> list[dict]:
        """One decoder layer's ``pred_logits``/``pred_boxes`` -> one dict per query group."""
        groups = outputs.get("query_groups", 1)
        if groups == 1:
            return [layer]
        return [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in
                zip(layer["pred_logits"].chunk(groups, 1), layer["pred_boxes"].chunk(groups, 1),
                    strict=True)]

