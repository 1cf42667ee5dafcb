"""The canonical dataset layout's names and rules, defined once.

A prepared dataset is ``annotations/{split}.json`` (COCO) plus ``images/{split}/`` for each
split in :data:`SPLITS`. An image's ``file_name`` is a path relative to its split's image
folder: :data:`UNSAFE_FILE_NAME` matches the names that would leave it.
"""

from __future__ import annotations

import re

SPLITS = ("train", "val")

# An absolute path (POSIX, Windows drive or UNC) or a ".." component anywhere. Kept as the
# pattern's text too, for Great Expectations' regex expectations.
UNSAFE_FILE_NAME = r"^(?:[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"
_UNSAFE = re.compile(UNSAFE_FILE_NAME)


def is_unsafe_file_name(name: str) -> bool:
    """True when ``name`` is absolute or has a ``..`` component (it would leave its folder)."""
    return _UNSAFE.search(name) is not None

# Tiled datasets (prepare.tile): annotations/<split>.json lists the tiles (each image record a
# `tile_of`: {"image_id", "file_name", "x0", "y0"} of its source image, untiled images as they
# are), annotations/<split>_whole.json the source images, whose files stay in images/<split>/.
TILE_OF = "tile_of"
TILES_FOLDER = "tiles"  # tile files: images/<split>/tiles/<source stem>_<x0>_<y0><suffix>


def whole_annotation_name(split: str) -> str:
    """The file name, in ``annotations/``, of a tiled split's whole-image annotations."""
    return f"{split}_whole.json"
