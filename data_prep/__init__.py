"""Turn caption datasets into webdataset shards with a manifest.

Pre-training sources: ``coco``, ``vg``, ``sbu``, ``cc3m``, ``flickr30k`` and ``synthetic``
(``python -m data_prep SOURCE --help``). They write the same sample schema:

- ``KEY.jpg``  the image (JPEG),
- ``KEY.txt``  one cleaned caption,
- ``KEY.json`` ``{"source", "image_id", "original_size": [w, h], "captions": [...], ...}``.

Downstream sources (``vqav2``, ``okvqa``, ``gqa``, ``nlvr2``, ``snli_ve``, ``nocaps`` and the
synthetic ``synthetic_vqa``, ``synthetic_nlvr2``, ``synthetic_ve``) write their task's schema
instead (:mod:`data_prep.tasks`; the README's Downstream section): a question, statement or
hypothesis in ``KEY.txt``, answers or labels in ``KEY.json``, NLVR2's two images as
``KEY.left.jpg`` / ``KEY.right.jpg``.

Shards are ``{prefix}-{000000..}.tar`` in the output directory, next to ``manifest.json``
and open_clip's ``sizes.json``. Runs are resumable: re-running a killed command keeps the
shards it completed and produces the same samples as an uninterrupted run.

This package deliberately does not import torch: it runs on data-preparation machines
that only need PIL, webdataset and img2dataset.
"""

__all__ = ["DataPrepError"]

from .errors import DataPrepError
