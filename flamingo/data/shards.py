"""Listing shards (brace lists, ``::`` lists, globs) and reading them sample by sample, with
damage reported rather than taken for an end. Writing them is :mod:`flamingo.data.writing`.
"""

from __future__ import annotations

import glob
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset import gopen
from webdataset.shardlists import expand_urls

GLOB = re.compile(r"[*?\[]")


def expand_shards(spec: str) -> list[str]:
    """Brace expansion, ``::`` lists and (local paths) globs, each glob's matches sorted:
    ``data/a-{000..009}.tar::data/b-*.tar``. A glob matching nothing is an error."""
    urls = []
    for url in expand_urls(spec):
        if GLOB.search(url) and "://" not in url:
            matches = sorted(glob.glob(url))
            if not matches:
                raise ValueError(f"{url!r} (in {spec!r}) matches no file")
            urls += matches
        else:
            urls.append(url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


def missing_local_shards(urls: list[str]) -> list[str]:
    """The local paths of ``urls`` that are not files (URLs and ``pipe:`` commands pass)."""
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    return [u for u in local if not Path(u.removeprefix("file:")).is_file()]


class ShardError(Exception):
    """A shard that could not be read to its end; every complete sample before the damage
    was yielded first. ``partial`` is the key of a sample cut off by it (or None)."""

    def __init__(self, url: str, detail: str, partial: str | None) -> None:
        lost = f"; sample {partial!r} was cut off and is not used" if partial else ""
        super().__init__(f"{url}: {detail}{lost}")
        self.url, self.detail, self.partial = url, detail, partial


class _Counted:
    """A read-only stream that counts the bytes it delivered."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        return data


def split_member(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.img0.jpg"`` -> ``("dir/KEY", "img0.jpg")`` (webdataset's rule: the key ends
    at the first dot of the file name; suffixes are lower-cased); None without a suffix."""
    head, _, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key or not suffix:
        return None
    return (f"{head}/{key}" if head else key), suffix.lower()


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (member suffix -> bytes, plus ``__key__``/``__url__``) of one tar shard.

    Members sharing a key form a sample; a sample is yielded once the next sample's header (or
    the end of the archive) shows that it is complete. A tar cut short (even between members,
    which ``tarfile`` alone takes for a normal end) or otherwise unreadable raises
    :class:`ShardError` after every complete sample before the damage. A sample holding one
    member name twice comes out with ``__bad__`` saying so (its first copy of each member is
    kept), for the reader to skip. Opening errors (a missing file) propagate as they are.
    """
    with gopen(url, "rb") as raw:
        stream = _Counted(raw)
        sample: dict[str, Any] | None = None
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    tar.members = []  # stream mode: do not keep every header in memory
                    parts = split_member(member.name) if member.isreg() else None
                    if parts is None or parts[0].rpartition("/")[2].startswith("__"):
                        continue  # directories, links, suffix-less names, webdataset __meta__
                    key, suffix = parts
                    if sample is not None and key != sample["__key__"]:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": url}
                    data = tar.extractfile(member).read()
                    if suffix in sample:
                        sample["__bad__"] = f"member {member.name!r} appears twice"
                    else:
                        sample[suffix] = data
                if getattr(tar.fileobj, "comptype", "tar") == "tar":
                    while stream.read(1 << 20):  # the padding after the end-of-archive marker
                        pass
                    if stream.bytes < tar.offset + tarfile.BLOCKSIZE:
                        raise tarfile.ReadError(
                            f"truncated: ends inside the member header at byte {tar.offset}"
                        )
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            partial = sample["__key__"] if sample is not None else None
            raise ShardError(url, f"{type(e).__name__}: {e}", partial) from e
        if sample is not None:
            yield sample
