"""Turn caption datasets into webdataset shards with a manifest.

Sources: ``coco``, ``vg``, ``sbu``, ``cc3m``, ``flickr30k`` and ``synthetic``
(``python -m data_prep SOURCE --help``). Every source writes the same sample schema:

- ``KEY.jpg``  the image (JPEG),
- ``KEY.txt``  one cleaned caption,
- ``KEY.json`` ``{"source", "image_id", "original_size": [w, h], "captions": [...], ...}``.

Shards are ``{prefix}-{000000..}.tar`` in the output directory, next to ``manifest.json``
and open_clip's ``sizes.json``. Runs are resumable: re-running a killed command keeps the
shards it completed and produces the same samples as an uninterrupted run.

This package deliberately does not import torch: it runs on data-preparation machines
that only need PIL, webdataset and img2dataset.
"""

__all__ = ["DataPrepError"]

from .errors import DataPrepError
