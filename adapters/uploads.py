"""Turn an upload (the two PEFT files, or one archive holding them) into `AdapterFiles`.

Every byte here is the tenant's and hostile until checked. Archives are read member by member
with every limit applied while iterating: member count, unpacked bytes (decompressed headers
included), names, kinds and compression methods. The weights never need to sit in memory: a
spooled upload is mapped read-only, and a member unpacked from an archive goes to a temporary
file that is mapped the same way.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import mmap
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import PurePosixPath
from typing import IO, Any, cast

from adapters.peft_format import Buffer
from adapters.validation import AdapterFiles, InvalidAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
MAX_CONFIG_BYTES = 1024 * 1024  # real adapter_config.json files are about 1 KB
MAX_ARCHIVE_MEMBERS = 1000  # a PEFT checkpoint directory holds a handful of files
MAX_ZIP_DIRECTORY_BYTES = 1024 * 1024  # the central directory of a zip: 1000 members of long names
TAR_HEADER_SLACK = 1024 * 1024  # tar headers and pax records, unpacked beside the members' bytes
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_CHUNK = 1024 * 1024


def collect_files(files: list[tuple[str, Buffer]], max_unpacked_bytes: int, scratch: ExitStack | None = None
                  ) -> AdapterFiles:
    """The two PEFT files from uploaded (filename, bytes) pairs: the files themselves, or one
    archive holding them at any depth. `scratch` owns the temporary files an archive unpacks to
    (without one they live as long as the returned object)."""
    found: dict[str, Buffer] = {}
    stack = scratch if scratch is not None else ExitStack()
    for filename, data in files:
        name = PurePosixPath(filename.replace("\\", "/")).name
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            for inner, inner_data in _unpack(name, data, max_unpacked_bytes, stack):
                _take(found, inner, inner_data)
        else:
            _take(found, name, data)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in found]
    if missing:
        raise InvalidAdapter(f"missing {' and '.join(missing)} in the upload")
    if len(found[CONFIG_NAME]) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_NAME} is larger than the {MAX_CONFIG_BYTES}-byte limit for it")
    return AdapterFiles(config=bytes(found[CONFIG_NAME]), weights=found[WEIGHTS_NAME])


def _take(found: dict[str, Buffer], name: str, data: Buffer) -> None:
    _refuse_pickle(name)
    if name not in (CONFIG_NAME, WEIGHTS_NAME):
        return  # README.md, training args and the like travel with adapters; ignore them
    if name in found:
        raise InvalidAdapter(f"{name} appears more than once in the upload")
    found[name] = data


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidAdapter(f"{name}: pickle weight files are refused (they can run code); upload {WEIGHTS_NAME}")


def _unpack(archive: str, data: Buffer, limit: int, stack: ExitStack) -> Iterator[tuple[str, Buffer]]:
    """(file name, bytes) of the members that matter, each name at most once."""
    seen: set[str] = set()
    budget = _Budget(archive, limit)
    try:
        members = _zip_members(archive, data, budget) if archive.lower().endswith(".zip") else \
            _tar_members(archive, data, budget)
        for path, open_member in members:
            name = PurePosixPath(path).name
            _refuse_pickle(name)
            if name not in (CONFIG_NAME, WEIGHTS_NAME):
                continue
            if name in seen:
                raise InvalidAdapter(f"{archive}: {name} appears more than once (as {path!r} and before)")
            seen.add(name)
            with open_member() as fh:
                yield name, _spool(fh, budget, stack)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise InvalidAdapter(f"{archive} is not a readable archive: {exc}") from exc


class _Budget:
    """Unpacked bytes and members so far, refused the moment either passes its limit."""

    def __init__(self, archive: str, limit: int) -> None:
        self.archive, self.limit = archive, limit
        self.slack = 0
        self.streamed = False  # every byte read is charged as the archive streams (tar), not per member
        self.bytes = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > MAX_ARCHIVE_MEMBERS:
            raise InvalidAdapter(f"{self.archive} has more than {MAX_ARCHIVE_MEMBERS} members, the limit for an "
                                 "adapter archive")

    def spend(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limit + self.slack:
            raise InvalidAdapter(f"{self.archive} unpacks to more than the {self.limit}-byte limit "
                                 "(max_adapter_bytes)")


def _zip_members(archive: str, data: Buffer, budget: _Budget) -> Iterator[tuple[str, Any]]:
    entries, directory_bytes = zip_directory_size(archive, data)
    # Checked before zipfile builds an object for every entry of the central directory.
    if entries > MAX_ARCHIVE_MEMBERS:
        raise InvalidAdapter(f"{archive} has {entries} members; the limit for an adapter archive is "
                             f"{MAX_ARCHIVE_MEMBERS}")
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InvalidAdapter(f"{archive} has a {directory_bytes}-byte central directory; the limit is "
                             f"{MAX_ZIP_DIRECTORY_BYTES}")
    zf = zipfile.ZipFile(_BufferFile(data))
    for info in zf.infolist():
        budget.member()
        if info.is_dir():
            continue
        _check_member_name(archive, info.filename)
        if info.flag_bits & 0x1:
            raise InvalidAdapter(f"{archive}: member {info.filename!r} is encrypted; upload it unencrypted")
        if info.compress_type not in _ZIP_METHODS:
            raise InvalidAdapter(f"{archive}: member {info.filename!r} uses zip compression method "
                                 f"{info.compress_type}; use stored, deflate, bzip2 or lzma")
        yield info.filename, lambda info=info: zf.open(info)


def zip_directory_size(archive: str, data: Buffer) -> tuple[int, int]:
    """(entries, central directory bytes) as the end-of-central-directory record declares them,
    zip64 included."""
    tail_start = max(0, len(data) - (22 + 65535))
    tail = bytes(data[tail_start:])
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise InvalidAdapter(f"{archive} has no end-of-central-directory record: not a readable zip archive")
    entries = int.from_bytes(tail[at + 10 : at + 12], "little")
    size = int.from_bytes(tail[at + 12 : at + 16], "little")
    locator = tail.rfind(b"PK\x06\x07", 0, at)
    if locator >= 0 and (entries == 0xFFFF or size == 0xFFFFFFFF):  # zip64: the real values are elsewhere
        record = int.from_bytes(tail[locator + 8 : locator + 16], "little")
        if record + 56 > len(data) or bytes(data[record : record + 4]) != b"PK\x06\x06":
            raise InvalidAdapter(f"{archive} has a broken zip64 end record: not a readable zip archive")
        entries = int.from_bytes(bytes(data[record + 32 : record + 40]), "little")
        size = int.from_bytes(bytes(data[record + 40 : record + 48]), "little")
    return entries, size


def _tar_members(archive: str, data: Buffer, budget: _Budget) -> Iterator[tuple[str, Any]]:
    # Decompressed here, through the budget: tar headers (and pax records) count as unpacked bytes,
    # so a few hundred KiB of gzip cannot unfold into gigabytes of headers.
    budget.streamed, budget.slack = True, TAR_HEADER_SLACK
    stream = _Counted(_decompressed(_BufferFile(data)), budget)
    with tarfile.open(fileobj=cast(Any, stream), mode="r|") as tf:
        for member in tf:
            budget.member()
            tf.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read; there is nothing to go back to
            if member.isdir():
                continue
            _check_member_name(archive, member.name)
            if not member.isfile():
                raise InvalidAdapter(f"{archive}: member {member.name!r} is not a regular file")
            yield member.name, lambda member=member: _closing(tf.extractfile(member))


def _decompressed(raw: Any) -> Any:
    magic = raw.read(6) or b""
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


class _Counted:
    """A read-only stream that charges every byte it hands out to the budget."""

    def __init__(self, inner: IO[bytes], budget: _Budget) -> None:
        self.inner, self.budget = inner, budget

    def read(self, n: int = -1) -> bytes:
        chunk = self.inner.read(min(n, _CHUNK) if n is not None and n >= 0 else _CHUNK)
        self.budget.spend(len(chunk))
        return chunk


def _closing(fh: IO[bytes] | None) -> IO[bytes]:
    if fh is None:
        raise InvalidAdapter("an archive member could not be read")
    return fh


class _BufferFile(io.RawIOBase):
    """A seekable read-only file over a buffer (a mapped upload), without copying it."""

    def __init__(self, data: Buffer) -> None:
        # Slices copy only what is read; a memoryview would pin the mapping open (BufferError on close).
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        n = max(0, min(len(out), len(self._data) - self._pos))
        out[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _spool(fh: IO[bytes], budget: _Budget, stack: ExitStack) -> Buffer:
    """Copy a member to a temporary file (charged to the budget) and map it read-only."""
    tmp = stack.enter_context(tempfile.TemporaryFile(prefix="loraplex-upload-"))  # noqa: SIM115 (the stack closes it)
    size = 0
    while chunk := fh.read(_CHUNK):
        if not budget.streamed:
            budget.spend(len(chunk))
        tmp.write(chunk)
        size += len(chunk)
    tmp.flush()
    return map_file(tmp.fileno(), size, stack)


def map_file(fileno: int, size: int, stack: ExitStack) -> Buffer:
    """The file mapped read-only, unmapped when the stack closes (an empty file maps to b"")."""
    if size == 0:
        return b""
    mapped = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)

    def unmap() -> None:
        with contextlib.suppress(BufferError):  # a view still held (a traceback's frame): the GC unmaps it
            mapped.close()

    stack.callback(unmap)
    return mapped


def _check_member_name(archive_name: str, member: str) -> None:
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidAdapter(f"{archive_name}: member {member!r} points outside the archive")
