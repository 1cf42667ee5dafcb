"""Training aids: each one module behind :class:`~detr.models.aids.base.TrainingAid`.

``AIDS`` lists every kind in the order the model applies them (query groups extend the object
queries before denoising appends its own), by their ``model.aids`` section name.
"""

from detr.models.aids.base import Queries, TrainingAid, block_diagonal
from detr.models.aids.denoising import Denoising
from detr.models.aids.dense import DenseHead
from detr.models.aids.query_groups import QueryGroups

AIDS: tuple[type[TrainingAid], ...] = (QueryGroups, Denoising, DenseHead)

__all__ = ["AIDS", "DenseHead", "Denoising", "Queries", "QueryGroups", "TrainingAid",
           "block_diagonal"]
