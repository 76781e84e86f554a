"""Shard specs: ``::``-joined sources, brace expansion, per-source weights, epoch sizes.

A source is a brace pattern (``/data/cc3m/cc3m-{000000..000331}.tar``), a single tar, or a
directory written by ``data_prep`` (its ``manifest.json`` lists the shards). Sizes come from
the directory's ``manifest.json`` (``shards: [{name, num_samples}]``) or open_clip's
``sizes.json`` (``{name: num_samples}``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand


class ShardSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    spec: str  # the text of this source in the spec
    urls: tuple[str, ...]  # its shards, expanded
    sizes: tuple[int | None, ...]  # samples per shard (None where unknown)

    @property
    def num_samples(self) -> int | None:
        if any(s is None for s in self.sizes):
            return None
        return int(sum(self.sizes))  # type: ignore[arg-type]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _read_sizes(directory: str) -> dict[str, int]:
    """Samples per shard file name from ``manifest.json`` or ``sizes.json`` in ``directory``."""
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            data = json.load(f)
        shards = data.get("shards") or []
        return {os.path.basename(s["name"]): int(s["num_samples"]) for s in shards}
    sizes = os.path.join(directory, "sizes.json")
    if os.path.isfile(sizes):
        with open(sizes) as f:
            return {os.path.basename(k): int(v) for k, v in json.load(f).items()}
    return {}


def _manifest_urls(directory: str) -> list[str]:
    manifest = os.path.join(directory, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            shards = json.load(f).get("shards") or []
        return [os.path.join(directory, os.path.basename(s["name"])) for s in shards]
    return sorted(str(p) for p in Path(directory).glob("*.tar"))


def expand_source(spec: str) -> Source:
    spec = spec.strip()
    if not spec:
        raise ShardSpecError("empty source in shard spec")
    if not _is_remote(spec) and os.path.isdir(spec):
        urls = _manifest_urls(spec)
        if not urls:
            raise ShardSpecError(f"{spec}: directory has no manifest.json shards and no *.tar files")
    else:
        urls = list(braceexpand.braceexpand(spec))
    sizes: list[int | None] = []
    cache: dict[str, dict[str, int]] = {}
    for url in urls:
        if _is_remote(url):
            sizes.append(None)
            continue
        directory = os.path.dirname(url) or "."
        if directory not in cache:
            cache[directory] = _read_sizes(directory)
        sizes.append(cache[directory].get(os.path.basename(url)))
    return Source(spec=spec, urls=tuple(urls), sizes=tuple(sizes))


def parse_shard_spec(spec: str, weights: list[float] | None = None) -> tuple[list[Source], list[float] | None]:
    """Split ``spec`` on ``::`` into sources; ``weights`` (one per source) are checked."""
    if not spec or not spec.strip():
        raise ShardSpecError("no shards given")
    sources = [expand_source(part) for part in spec.split("::")]
    if weights is not None:
        if len(weights) != len(sources):
            raise ShardSpecError(f"{len(sources)} sources but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ShardSpecError(f"weights must be >= 0 with a positive sum, got {weights}")
    return sources, weights


def shard_weights(sources: list[Source], weights: list[float] | None) -> tuple[list[str], list[float]]:
    """All urls with the draw weight of each, for sampling shards with replacement.

    A draw of shard ``u`` yields ``size_u`` samples. Unweighted, every shard is equally likely,
    so every sample is. Weighted, a shard of source ``s`` gets ``w_s / samples_s``: the expected
    share of samples from ``s`` is then ``w_s / sum(w)``, uniform within the source (sizes
    unknown: ``w_s / shards_s``, i.e. shards assumed equal)."""
    urls: list[str] = []
    out: list[float] = []
    for i, src in enumerate(sources):
        n, total = len(src.urls), src.num_samples
        if weights is None:
            per = [1.0] * n
        else:
            w = float(weights[i])
            per = [w / total] * n if total else [w / n] * n
        urls.extend(src.urls)
        out.extend(per)
    return urls, out


def total_samples(sources: list[Source]) -> int | None:
    n = [s.num_samples for s in sources]
    return None if any(x is None for x in n) else int(sum(n))  # type: ignore[arg-type]
