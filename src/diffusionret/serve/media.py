"""Serving indexed video files: a symlink-free open checked against the catalogue, and Range requests.

The path comes from the index, never from the request, but the file at that path may have changed
since it was indexed: a user who can write into a video folder could replace a video with a symlink
to ``~/.ssh/id_rsa``. So:

* the recorded path (absolute and symlink-free when it was indexed, see
  :mod:`diffusionret.index.discover`) is opened one component at a time with ``O_NOFOLLOW``: a
  symlink anywhere on it now means the file is not the one indexed (404);
* the open file must be a regular file with the size and modification time the catalogue recorded
  (409 until ``index update`` has seen the change);
* the response is streamed from that open descriptor, so nothing can be swapped in between the
  checks and the read.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from diffusionret.index.catalog import VideoRecord
from diffusionret.serve.errors import ApiError
from diffusionret.serve.security import ascii_int

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024
# Range values are byte offsets: 20 digits hold any 64-bit size.
MAX_OFFSET_DIGITS = 20
# More parts than a player asks for only multiply work (overlapping parts are merged first anyway).
MAX_RANGE_PARTS = 32
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# A FIFO swapped in for a video must not block the open.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

Ranges = list[tuple[int, int]]


def check_range(header: str | None, size: int) -> Ranges | None:
    """Parse a ``Range`` header into byte ranges, refusing bad ones as JSON errors.

    Byte units only, every part ``a-b``, ``a-`` or ``-n`` (ASCII digits) with ``a <= b``; any part
    starting past the end makes the request unsatisfiable (416 with ``Content-Range: bytes */size``).

    Returns:
        ``None`` without a header, else sorted, merged ``(start, stop)`` pairs (``stop`` exclusive).

    Raises:
        ApiError: 400 for a malformed header, 416 for an unsatisfiable one.
    """
    if header is None:
        return None
    units, sep, spec = header.partition("=")
    if not sep or units.strip().lower() != "bytes":
        raise ApiError(400, "invalid_range", "only 'bytes=' ranges are supported")
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise ApiError(400, "invalid_range", "empty Range header")
    if len(parts) > MAX_RANGE_PARTS:
        raise ApiError(400, "invalid_range", f"more than {MAX_RANGE_PARTS} ranges")
    ranges: Ranges = []
    unsatisfiable = False
    for part in parts:
        first, dash, last = (x.strip() for x in part.partition("-"))
        start = ascii_int(first, MAX_OFFSET_DIGITS) if first else None
        end = ascii_int(last, MAX_OFFSET_DIGITS) if last else None
        if not dash or not (first or last) or (first and start is None) or (last and end is None):
            raise ApiError(400, "invalid_range", f"malformed range {part[:40]!r}")
        if start is not None:
            if end is not None and end < start:
                raise ApiError(400, "invalid_range", f"range {part[:40]!r} ends before it starts")
            unsatisfiable |= start >= size
            ranges.append((start, size if end is None else min(end + 1, size)))
        else:
            assert end is not None
            unsatisfiable |= end == 0 or size == 0
            ranges.append((max(size - end, 0), size))
    if unsatisfiable:
        raise ApiError(416, "range_not_satisfiable", f"the file has {size} bytes",
                       {"Content-Range": f"bytes */{size}"})
    merged: Ranges = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def validators(st: os.stat_result) -> tuple[str, str]:
    """``(ETag, Last-Modified)`` of a file state (strong ETag: size and mtime in nanoseconds)."""
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"', formatdate(st.st_mtime, usegmt=True)


def if_range_matches(if_range: str, etag: str, last_modified: str) -> bool:
    """RFC 7233 3.2: serve the range only for an exact ETag or Last-Modified match; else the whole file."""
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag  # weak tags never match
    try:
        return parsedate_to_datetime(if_range) == parsedate_to_datetime(last_modified)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


def open_indexed(record: VideoRecord) -> tuple[int, os.stat_result]:
    """Open the file of ``record`` without following symlinks and check it is the file that was indexed.

    Returns:
        An open read-only descriptor (the caller closes it) and its ``fstat``.

    Raises:
        ApiError: 404 when the file is gone, is not a regular file or has a symlink on its path;
            409 when its size or modification time differ from the catalogue's.
    """
    path = Path(record.path)
    try:
        fd = _open_without_symlinks(path)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            logger.warning("refusing to serve %s: a symlink is on its path (it was indexed without one)", path)
        raise ApiError(404, "not_found", "the video file is no longer available") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            logger.warning("refusing to serve %s: not a regular file", path)
            raise ApiError(404, "not_found", "the video file is no longer available")
        if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
            raise ApiError(409, "changed", "the video file changed since it was indexed; run `diffusionret "
                                           "index update` to serve the new version")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_without_symlinks(path: Path) -> int:
    if not path.is_absolute():
        raise OSError(errno.ENOENT, "not an absolute path", str(path))
    if not _NOFOLLOW:  # no O_NOFOLLOW (Windows): compare with the resolved path instead
        if os.path.realpath(path) != str(path):
            raise OSError(errno.ELOOP, "symlink on the path", str(path))
        return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    directory = os.open(path.anchor, os.O_RDONLY | _DIRECTORY)
    try:
        for part in path.parts[1:-1]:
            inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(path.name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=directory)
    finally:
        os.close(directory)
    if _NONBLOCK:
        os.set_blocking(fd, True)
    return fd


class DescriptorResponse(Response):
    """Streams an open file descriptor: the whole file (200), one range or several (206, multipart).

    Owns ``fd`` and closes it once sent (or when the send fails).
    """

    def __init__(self, fd: int, size: int, media_type: str, ranges: Ranges | None,
                 headers: dict[str, str]) -> None:
        self.fd, self.size, self.ranges = fd, size, ranges
        self.boundary = secrets.token_hex(13)
        self.parts: list[tuple[bytes, int, int]] = []  # (part header, start, stop)
        extra = {"accept-ranges": "bytes", **headers}
        if not ranges:
            status, length, content_type = 200, size, media_type
        elif len(ranges) == 1:
            (start, stop), = ranges
            status, length, content_type = 206, stop - start, media_type
            extra["content-range"] = f"bytes {start}-{stop - 1}/{size}"
        else:
            status, content_type = 206, f"multipart/byteranges; boundary={self.boundary}"
            for start, stop in ranges:
                head = (f"--{self.boundary}\r\nContent-Type: {media_type}\r\n"
                        f"Content-Range: bytes {start}-{stop - 1}/{size}\r\n\r\n").encode()
                self.parts.append((head, start, stop))
            length = sum(len(h) + (stop - start) + 2 for h, start, stop in self.parts) + len(self._closing())
        super().__init__(None, status_code=status, headers=extra, media_type=content_type)
        self.headers["content-length"] = str(length)

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    async def _send_bytes(self, send: Send, start: int, stop: int) -> None:
        while start < stop:
            chunk = await anyio.to_thread.run_sync(os.pread, self.fd, min(CHUNK, stop - start), start)
            if not chunk:  # the file shrank while being sent: end the body short rather than hang
                raise OSError(errno.EIO, "file shrank while being sent")
            start += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _send_all(self, scope: Scope, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method", "GET").upper() != "HEAD":
            if self.parts:
                for head, start, stop in self.parts:
                    await send({"type": "http.response.body", "body": head, "more_body": True})
                    await self._send_bytes(send, start, stop)
                    await send({"type": "http.response.body", "body": b"\r\n", "more_body": True})
                await send({"type": "http.response.body", "body": self._closing(), "more_body": True})
            else:
                start, stop = self.ranges[0] if self.ranges else (0, self.size)
                await self._send_bytes(send, start, stop)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> Any:
        try:
            # A player that seeks drops its connection mid-file: stop reading then, not at the end.
            async with anyio.create_task_group() as group:
                async def send_then_stop() -> None:
                    await self._send_all(scope, send)
                    group.cancel_scope.cancel()

                group.start_soon(send_then_stop)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            os.close(self.fd)
