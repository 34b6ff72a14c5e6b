"""Crash-safe file writes for run folders: whole files appear at once, JSON lines are appended whole.

Disk faults while writing (disk full ``ENOSPC``/``EDQUOT``, read-only filesystem ``EROFS``, permission denied
``EACCES``/``EPERM``) raise :class:`OutputWriteError`, which names the path and the fix, and leave nothing
half-done: the temporary file is removed and the target keeps its previous complete content
(:func:`write_bytes_atomic`), or the log is cut back to its previous length so no torn line is left
(:func:`append_json_line`). Other ``OSError`` s are cleaned up the same way and re-raised unchanged.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sdxl_core.errors import SdxlBenchError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS})
PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
WRAPPED_ERRNOS = DISK_FULL_ERRNOS | READ_ONLY_ERRNOS | PERMISSION_ERRNOS

WRITABLE_FIX = "choose a writable --run-dir / --out"


class OutputWriteError(SdxlBenchError, OSError):
    """A run-folder file could not be written: disk full, read-only filesystem or permission denied.

    Also an ``OSError`` (``errno``, ``filename`` set) so existing ``except OSError`` handlers still apply.
    ``reason`` is ``"disk-full"``, ``"read-only"`` or ``"permission-denied"``; ``intact`` says whether the
    target was left exactly as before (``False`` only if an append could not be cut back).
    """

    def __init__(self, message: str, *, path: Path, errno_: int, reason: str, intact: bool = True):
        super().__init__(message)
        self.message = message
        self.path = Path(path)
        self.errno = errno_
        self.filename = str(path)
        self.reason = reason
        self.intact = intact

    def __str__(self) -> str:
        return self.message


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.exists(p) and p != p.parent:
        p = p.parent
    return p


def _mount_point(path: Path) -> Path:
    p = _existing_ancestor(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def output_write_error(path: str | Path, exc: OSError, *, doing: str = "write", intact: bool = True,
                       needed: int | None = None) -> OutputWriteError | None:
    """The :class:`OutputWriteError` for a disk fault ``exc`` while writing ``path``; ``None`` for other errors."""
    code = getattr(exc, "errno", None)
    if code not in WRAPPED_ERRNOS:
        return None
    path = Path(path)
    folder = path.parent
    state = ("nothing was changed" if intact else
             "the file may end in an incomplete line, which read_json_lines skips")
    detail = os.strerror(code)
    if code in DISK_FULL_ERRNOS:
        mount = _mount_point(folder)
        try:
            free = f"{_human_bytes(shutil.disk_usage(_existing_ancestor(folder)).free)} free"
        except OSError:
            free = "free space unknown"
        need = f", {_human_bytes(needed)} needed" if needed else ""
        what = "the disk quota is exhausted" if code == errno.EDQUOT else "the disk is full"
        message = (f"could not {doing} {path}: {what} ({detail}; {free} on {mount}{need}); {state}. "
                   f"Fix: free space on {mount}, or {WRITABLE_FIX} on another disk")
        reason = "disk-full"
    elif code in READ_ONLY_ERRNOS:
        message = (f"could not {doing} {path}: {_mount_point(folder)} is a read-only filesystem ({detail}); "
                   f"{state}. Fix: {WRITABLE_FIX}")
        reason = "read-only"
    else:
        message = (f"could not {doing} {path}: permission denied ({detail}); {state}. "
                   f"Fix: {WRITABLE_FIX}, or make {folder} writable for this user")
        reason = "permission-denied"
    return OutputWriteError(message, path=path, errno_=code, reason=reason, intact=intact)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, data: bytes | memoryview) -> int:
    """``os.write`` until all of ``data`` is written (a full disk gives short writes, then ``ENOSPC``)."""
    view = memoryview(data)
    total = 0
    while view:
        n = os.write(fd, view)
        total += n
        view = view[n:]
    return total


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    On any failure the temporary file is removed and ``path`` keeps its previous content; a disk fault raises
    :class:`OutputWriteError` (other errors are re-raised as they are).
    """
    path = Path(path)
    tmp: str | None = None
    try:
        os.makedirs(path.parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            _close_quietly(fd)
            raise
        os.close(fd)  # can report a deferred write error (network filesystems)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if tmp is not None:
            _unlink_quietly(tmp)
        err = output_write_error(path, exc, needed=len(data))
        if err is None:
            raise
        raise err from exc
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_png_atomic(path: str | Path, image: Any) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def append_json_line(path: str | Path, obj: dict[str, Any]) -> None:
    """Append one complete JSON line with a single ``write`` on an ``O_APPEND`` descriptor, then fsync.

    If the file ends in a torn line (a crash mid-write), a newline is written first so the new line stays whole.
    If the write or fsync fails (e.g. a full disk: a short write, then ``ENOSPC``), the file is cut back to its
    length before this call, so it holds no part of the new line; a disk fault raises :class:`OutputWriteError`.
    """
    path = Path(path)
    line = (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        err = output_write_error(path, exc, doing="append to", needed=len(line))
        if err is None:
            raise
        raise err from exc
    size: int | None = None
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            line = b"\n" + line
        _write_all(fd, line)
        os.fsync(fd)
    except BaseException as exc:
        intact = size is None or _cut_back(path, fd, size, line)
        _close_quietly(fd)
        err = output_write_error(path, exc, doing="append to", intact=intact, needed=len(line)) \
            if isinstance(exc, OSError) else None
        if err is None:
            raise
        raise err from exc
    _close_quietly(fd)  # the line is written and fsynced: a late close error changes nothing


def _last_byte(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 1, size - 1)
    finally:
        os.close(fd)


def _cut_back(path: Path, fd: int, size: int, line: bytes) -> bool:
    """After a failed append of ``line`` to a log that was ``size`` bytes long: truncate it back to ``size`` if
    what follows is a part of ``line``; ``True`` if the log is as before.

    Nothing is cut if the file grew by anything else (another writer's line): that stays, whole or torn.
    """
    try:
        grown = os.fstat(fd).st_size - size
        if grown == 0:
            return True
        if not 0 < grown <= len(line):
            return False
        rfd = os.open(path, os.O_RDONLY)
        try:
            tail = os.pread(rfd, grown, size)
        finally:
            os.close(rfd)
        if tail != line[:grown]:
            return False
        os.ftruncate(fd, size)
        try:
            os.fsync(fd)
        except OSError:
            pass
        return True
    except OSError:
        return False


def read_json_lines(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete JSON object lines of ``path``; torn or unparsable lines are skipped (none if missing)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                continue  # torn last line
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(obj, dict):
                yield obj
