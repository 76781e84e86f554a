"""webdataset loading: shard specs, node/worker split, decode, ALBEF transforms, resume position."""
from .loader import (LoaderPosition, SkipCounter, TrainLoader, build_eval_loader, eval_num_samples,
                     worker_batches)
from .shards import ShardSpecError, parse_shard_spec
from .transforms import MEAN, STD, denormalize, eval_transform, pre_caption, TrainTransform, normalize

__all__ = ["LoaderPosition", "SkipCounter", "TrainLoader", "build_eval_loader", "eval_num_samples",
           "worker_batches", "ShardSpecError", "parse_shard_spec", "MEAN", "STD", "denormalize",
           "eval_transform", "pre_caption", "TrainTransform", "normalize"]
