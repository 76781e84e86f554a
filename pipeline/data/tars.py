"""Tar shards -> samples with an account per shard: nothing is lost without a count.

webdataset's ``tarfile_to_samples`` reads a tar cut at or inside a header as a normal end of
archive (Python's ``tarfile`` stops there without an error), and an unreadable shard is one line
in a rate-limited log. :class:`ShardReader` reads the same way (``tar_file_expander``,
``group_by_keys``; streams opened without a shell by :func:`pipeline.data.shards.open_shard`) and, at the end of each shard, compares the samples it
read with the count the manifest lists; without a manifest count it checks that a ``.tar`` ends
with tar's end-of-archive marker (two zero blocks). A short, cut or missing shard is logged by
name with the samples it lacks, and those samples are added to the reader's error count
(``data/skipped_samples`` in TensorBoard), once per reader (worker and epoch) and shard.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from webdataset.tariterators import group_by_keys, tar_file_expander

from .shards import open_shard

log = logging.getLogger(__name__)

END_OF_ARCHIVE = 1024  # two 512-byte zero blocks close every tar archive


class _TailStream:
    """A read-only stream that keeps the last ``END_OF_ARCHIVE`` bytes it delivered."""

    def __init__(self, stream):
        self.stream, self.tail = stream, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail = (self.tail + data)[-END_OF_ARCHIVE:]
        return data

    def ends_with_marker(self) -> bool:
        """Read what the tar reader left (record padding) and check the archive's last bytes."""
        while self.read(1 << 16):
            pass
        return len(self.tail) == END_OF_ARCHIVE and self.tail.count(0) == END_OF_ARCHIVE

    def close(self) -> None:
        self.stream.close()


class ShardReader:
    """Samples of the shards an iterator of ``{"url": ...}`` names, with the account above.

    ``handler`` is the webdataset error handler (counts one error, returns True to go on);
    ``lost(n)`` adds ``n`` samples to the same count without logging; ``expected`` maps a shard's
    URL to the samples its manifest lists.
    """

    def __init__(self, handler: Callable[[BaseException], bool], lost: Callable[[int], None],
                 expected: dict[str, int]):
        self.handler, self.lost, self.expected = handler, lost, expected
        self.reported: set[str] = set()

    def _report(self, url: str, problem: str, missing: int, counted: int) -> None:
        if url in self.reported:  # a shard read again in the same epoch lacks the same samples
            return
        self.reported.add(url)
        self.lost(max(0, missing - counted))  # the handler already counted one per exception
        log.warning("shard %s %s: %d sample(s) missing from this epoch", url, problem, missing)

    def samples(self, src) -> Iterator[dict]:
        for item in src:
            url = item["url"]
            want = self.expected.get(url)
            try:
                stream = _TailStream(open_shard(url))
            except Exception as exn:  # noqa: BLE001 - every cause of an unreadable shard is reported
                self._report(url, f"cannot be opened ({exn})", want or 1, 0)
                continue
            failures = []

            def handler(exn, failures=failures):
                failures.append(exn)
                return self.handler(exn)

            read = 0
            try:
                files = tar_file_expander([dict(url=url, stream=stream)], handler=handler, eof_value=None)
                for sample in group_by_keys(files, handler=handler):
                    read += 1
                    yield sample
                # reached only when the shard was read to its end
                if want is not None and read < want:
                    self._report(url, f"has {read} of the {want} samples its manifest lists", want - read,
                                 len(failures))
                elif want is None and not failures and url.endswith(".tar") and not stream.ends_with_marker():
                    self._report(url, "ends without tar's end-of-archive marker (cut short?)", 1, 0)
            finally:
                stream.close()
