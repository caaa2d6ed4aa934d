"""WebDataset tar files and their DALI index files.

A shard is a plain (uncompressed) POSIX tar whose members are grouped by key:
``KEY.jpg`` (the image bytes, never re-encoded unless asked), ``KEY.cls`` (the label as ASCII
digits) and ``KEY.json`` (original path, label, class name). Keys are the zero-padded sample
id, so ``int(key)`` is the id in any reader. Next to each ``NNNNNN.tar`` lies ``NNNNNN.idx``,
the index DALI's ``fn.readers.webdataset`` uses to seek instead of scanning the tar:

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   (one line a sample)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from filterx.io.atomic import atomic_path

INDEX_VERSION = "v1.2"
KEY_DIGITS = 10


def sample_key(sample_id: int) -> str:
    """The tar key of a sample: its id, zero-padded so that keys sort like ids."""
    return f"{sample_id:0{KEY_DIGITS}d}"


@dataclass(frozen=True)
class TarSample:
    """One sample to write: key plus ``{extension: bytes}`` members, written in that order."""

    key: str
    members: dict[str, bytes]


@dataclass(frozen=True)
class MemberEntry:
    """Where one member's data lies inside a tar."""

    key: str
    ext: str
    offset: int
    size: int


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    # Fixed metadata: the same samples give byte-identical tars, whoever writes them and when.
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


def write_tar(path: str | os.PathLike, samples: Iterable[TarSample]) -> list[MemberEntry]:
    """Write ``samples`` to a tar at ``path`` atomically, and its DALI index beside it.

    Returns the member entries (offsets of each member's data) in write order.
    """
    path = Path(path)
    entries: list[MemberEntry] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.members.items():
                    name = f"{sample.key}.{ext}"
                    # The header takes 512 bytes; data follows right after it.
                    offset = tar.offset + tarfile.BLOCKSIZE
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                    entries.append(MemberEntry(sample.key, ext, offset, len(data)))
    write_index(index_path(path), entries)
    return entries


def index_path(tar_path: str | os.PathLike) -> Path:
    """The DALI index file that belongs to a tar: same name, ``.idx`` suffix."""
    return Path(tar_path).with_suffix(".idx")


def write_index(path: str | os.PathLike, entries: Iterable[MemberEntry]) -> None:
    """Write a DALI webdataset index (format above) atomically."""
    lines: list[str] = []
    current: str | None = None
    for e in entries:
        part = f"{e.ext} {e.offset} {e.size} {e.key}.{e.ext}"
        if e.key != current:
            lines.append(part)
            current = e.key
        else:
            lines[-1] += " " + part
    with atomic_path(path) as tmp:
        Path(tmp).write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(l + "\n" for l in lines))


def scan_tar(path: str | os.PathLike) -> list[MemberEntry]:
    """Member entries of an existing tar, read from its headers (no data is read).

    Raises ValueError naming the file when the tar is truncated or not a tar.
    """
    entries: list[MemberEntry] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, dot, ext = m.name.rpartition(".")
                if not dot:
                    continue
                entries.append(MemberEntry(key, ext, m.offset_data, m.size))
        size = os.path.getsize(path)
        for e in entries:
            if e.offset + e.size > size:
                raise tarfile.ReadError(f"member {e.key}.{e.ext} runs past the end of the file")
    except (tarfile.ReadError, EOFError) as exc:
        raise ValueError(f"{path}: not a complete tar file ({exc})") from None
    return entries


def rebuild_index(tar_path: str | os.PathLike) -> Path:
    """(Re)write the DALI index of a tar from its headers; returns the index path."""
    out = index_path(tar_path)
    write_index(out, scan_tar(tar_path))
    return out


def read_index(path: str | os.PathLike) -> list[MemberEntry]:
    """Parse a DALI index file back into member entries (for checks and re-sharding)."""
    lines = Path(path).read_text().splitlines()
    version, _, count = lines[0].partition(" ")
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"{path}: not a {INDEX_VERSION} index for {len(lines) - 1} samples")
    entries = []
    for line in lines[1:]:
        f = line.split(" ")
        for i in range(0, len(f), 4):
            ext, offset, size, name = f[i : i + 4]
            entries.append(MemberEntry(name.rpartition(".")[0], ext, int(offset), int(size)))
    return entries


def tar_complete(tar_path: str | os.PathLike, keys: Iterable[str]) -> bool:
    """Whether a tar and its index exist and hold exactly the samples ``keys`` (a resumed
    writer's test for "this tar is done"; the index is written after the tar)."""
    tar_path = Path(tar_path)
    idx = index_path(tar_path)
    if not (tar_path.is_file() and idx.is_file()):
        return False
    try:
        entries = read_index(idx)
        check_complete(tar_path, entries)
    except (ValueError, IndexError):
        return False
    return {e.key for e in entries} == set(keys)


def check_complete(tar_path: str | os.PathLike, entries: Iterable[MemberEntry] | None = None) -> None:
    """ValueError naming the tar if its index points past the end of the file (a truncated copy)."""
    entries = read_index(index_path(tar_path)) if entries is None else entries
    end = max((e.offset + e.size for e in entries), default=0)
    size = os.path.getsize(tar_path)
    if size < end:
        raise ValueError(f"shard {tar_path} is truncated ({size} bytes, its index needs {end}); "
                         "restore it or re-shard the dataset")


def index_extent(path: str | os.PathLike) -> tuple[int, int]:
    """(samples, end of the last member's data) of a DALI index, from its first and last lines
    only (members are indexed in the order they lie in the tar). ValueError naming the file
    when it is not an index."""
    lines = Path(path).read_text().splitlines()
    try:
        version, _, count = lines[0].partition(" ")
        if version != INDEX_VERSION or int(count) != len(lines) - 1:
            raise ValueError
        f = lines[-1].split(" ") if len(lines) > 1 else []
        if len(f) % 4:
            raise ValueError
        end = max((int(f[i + 1]) + int(f[i + 2]) for i in range(0, len(f), 4)), default=0)
    except (ValueError, IndexError):
        raise ValueError(f"{path}: not a {INDEX_VERSION} index") from None
    return int(count), end


def tar_size_bounds(data_end: int) -> tuple[int, int]:
    """The smallest and largest size of a complete tar whose last member's data ends at byte
    ``data_end``: the data padded to a 512-byte block, then the end-of-archive marker (two zero
    blocks), then at most the padding to a whole record (20 blocks) that tarfile and GNU tar add."""
    block, record = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
    least = -(-data_end // block) * block + 2 * block
    return least, -(-least // record) * record


def read_member(f, e: MemberEntry, tar_path: str | os.PathLike) -> bytes:
    """The data of member ``e`` from ``f``, the open tar ``tar_path``, by offset (no tar
    parsing): the one reader of member bytes; ValueError naming the member when it is cut short."""
    f.seek(e.offset)
    data = f.read(e.size)
    if len(data) != e.size:
        raise ValueError(f"{tar_path}: member {e.key}.{e.ext} is truncated")
    return data


def read_members(tar_path: str | os.PathLike, entries: Iterable[MemberEntry]) -> Iterator[tuple[MemberEntry, bytes]]:
    """Read the data of the given members by offset (no tar parsing)."""
    with open(tar_path, "rb") as f:
        for e in entries:
            yield e, read_member(f, e, tar_path)


def sample_members(image: bytes, label: int, meta: dict) -> dict[str, bytes]:
    """The members filterx writes for one sample, in the order readers expect."""
    return {
        "jpg": image,
        "cls": str(label).encode(),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(),
    }
