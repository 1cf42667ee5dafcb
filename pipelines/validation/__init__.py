"""The dataset checks behind the ``validate`` stage: the tables read from a canonical COCO
layout and the Great Expectations suite over them."""
