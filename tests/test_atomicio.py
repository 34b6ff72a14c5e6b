"""sdxl_core.atomicio under disk faults: disk full, read-only filesystem and permission denied, injected at every
system call of a write (tests run as root, so chmod cannot stop a write). Each fault must give an
OutputWriteError that names the path and the fix, leave the previous content intact and no temporary file,
and leave an appended log whose lines all parse."""

from __future__ import annotations

import errno
import json
import os

import pytest
from PIL import Image

from sdxl_core import atomicio
from sdxl_core.atomicio import (OutputWriteError, append_json_line, read_json_lines, write_bytes_atomic,
                                write_json_atomic, write_png_atomic, write_text_atomic)
from sdxl_core.errors import SdxlBenchError

FAULTS = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM]
FIX = {errno.ENOSPC: "free space on", errno.EDQUOT: "free space on", errno.EROFS: "choose a writable --run-dir / --out",
       errno.EACCES: "choose a writable --run-dir / --out", errno.EPERM: "choose a writable --run-dir / --out"}
REASON = {errno.ENOSPC: "disk-full", errno.EDQUOT: "disk-full", errno.EROFS: "read-only",
          errno.EACCES: "permission-denied", errno.EPERM: "permission-denied"}


class Faulty:
    """Stands in for a module inside atomicio: call number ``at`` (and later) of function ``name`` fails with
    ``OSError(code)``. ``partial``: the first failing ``write`` first writes half its buffer for real and returns
    (a short write, as a filling disk gives), the next call fails. ``then_real``: the real call runs before the
    error (``close`` closes the descriptor even when it reports an error). ``before``: run before raising."""

    def __init__(self, real, name, code, at=1, partial=False, then_real=False, before=None):
        self.real, self.name, self.code, self.at = real, name, code, at
        self.partial, self.then_real, self.before = partial, then_real, before
        self.calls = self.fired = 0

    def __getattr__(self, attr):
        value = getattr(self.real, attr)
        if attr != self.name:
            return value

        def faulty(*args, **kwargs):
            self.calls += 1
            if self.calls < self.at:
                return value(*args, **kwargs)
            if self.partial:
                self.partial = False
                fd, data = args
                return value(fd, memoryview(data)[: max(1, len(data) // 2)])
            if self.then_real:
                value(*args, **kwargs)
            if self.before:
                self.before()
            self.fired += 1
            raise OSError(self.code, os.strerror(self.code))

        return faulty


def _inject(monkeypatch, module_name, name, code, **kw) -> Faulty:
    fake = Faulty(getattr(atomicio, module_name), name, code, **kw)
    monkeypatch.setattr(atomicio, module_name, fake)
    return fake


def _check_error(exc: OutputWriteError, path, code):
    assert isinstance(exc, SdxlBenchError) and isinstance(exc, OSError)
    assert exc.errno == code and exc.reason == REASON[code]
    assert exc.path == path and exc.filename == str(path)
    msg = str(exc)
    assert str(path) in msg and FIX[code] in msg and os.strerror(code) in msg
    assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == code


# ------------------------------------------------------------------------------------------- whole files

# (module in atomicio, function, options): every system call write_bytes_atomic makes on the way
WRITE_POINTS = [
    ("os", "makedirs", {}),
    ("tempfile", "mkstemp", {}),
    ("os", "write", {}),
    ("os", "write", {"partial": True}),
    ("os", "fsync", {}),
    ("os", "close", {"then_real": True}),
    ("os", "replace", {}),
]

OLD = b'{"old": "complete previous content"}\n'
NEW = b"x" * 300_000  # big enough for a real short write


def test_whole_file_write_faults_leave_the_previous_content(tmp_path, monkeypatch):
    tried = 0
    for code in FAULTS:
        for module_name, name, kw in WRITE_POINTS:
            folder = tmp_path / f"{errno.errorcode[code]}-{name}-{tried}"
            folder.mkdir()
            target = folder / "results.json"
            target.write_bytes(OLD)
            with monkeypatch.context() as mp:
                fake = _inject(mp, module_name, name, code, **kw)
                with pytest.raises(OutputWriteError) as info:
                    write_bytes_atomic(target, NEW)
            assert fake.fired == 1, (code, name)  # the fault was really hit
            _check_error(info.value, target, code)
            assert target.read_bytes() == OLD
            assert sorted(os.listdir(folder)) == ["results.json"]  # no temporary file left
            tried += 1
    assert tried == len(FAULTS) * len(WRITE_POINTS) == 35


def test_fault_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "run" / "new.json"
    _inject(monkeypatch, "os", "write", errno.ENOSPC, partial=True)
    with pytest.raises(OutputWriteError, match="disk is full"):
        write_bytes_atomic(target, NEW)
    assert os.listdir(target.parent) == []


def test_disk_full_message_names_the_mount_free_space_and_size(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    _inject(monkeypatch, "os", "write", errno.ENOSPC)
    with pytest.raises(OutputWriteError) as info:
        write_bytes_atomic(target, NEW)
    msg = str(info.value)
    mount = str(atomicio._mount_point(tmp_path))
    assert f"free space on {mount}" in msg and " free on " in msg and "293.0 KiB needed" in msg
    assert "nothing was changed" in msg and info.value.intact


@pytest.mark.parametrize("writer,value", [
    (write_text_atomic, "text\n"),
    (write_json_atomic, {"a": 1}),
    (write_png_atomic, Image.new("RGB", (8, 8))),
])
def test_every_whole_file_writer_reports_disk_faults(tmp_path, monkeypatch, writer, value):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    _inject(monkeypatch, "os", "fsync", errno.ENOSPC)
    with pytest.raises(OutputWriteError):
        writer(target, value)
    assert target.read_bytes() == OLD and os.listdir(tmp_path) == ["out.bin"]


def test_other_os_errors_are_cleaned_up_and_raised_unchanged(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_bytes(OLD)
    _inject(monkeypatch, "os", "fsync", errno.EIO)
    with pytest.raises(OSError) as info:
        write_bytes_atomic(target, NEW)
    assert not isinstance(info.value, OutputWriteError) and info.value.errno == errno.EIO
    assert target.read_bytes() == OLD and os.listdir(tmp_path) == ["results.json"]


def test_interrupt_mid_write_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_bytes(OLD)

    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomicio, "os", Faulty(os, "none", 0))
    monkeypatch.setattr(atomicio.os, "write", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, NEW)
    assert target.read_bytes() == OLD and os.listdir(tmp_path) == ["results.json"]


def test_successful_writes_are_unchanged(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json_atomic(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    write_bytes_atomic(target, NEW)
    assert target.read_bytes() == NEW and os.listdir(target.parent) == ["b.json"]


def test_output_write_error_is_an_oserror_and_an_sdxlbencherror():
    exc = atomicio.output_write_error("/x/y.json", OSError(errno.EROFS, "Read-only file system"))
    assert isinstance(exc, OutputWriteError) and isinstance(exc, OSError) and isinstance(exc, SdxlBenchError)
    assert str(exc).startswith("could not write /x/y.json: ") and "read-only filesystem" in str(exc)
    assert atomicio.output_write_error("/x", OSError(errno.EIO, "I/O error")) is None
    assert atomicio.output_write_error("/x", OSError("no errno")) is None


# ------------------------------------------------------------------------------------------- appended logs

# every system call append_json_line makes on the way (the second os.open reads the last byte of the log)
APPEND_POINTS = [
    ("os", "open", {}),
    ("os", "open", {"at": 2}),
    ("os", "pread", {}),
    ("os", "write", {}),
    ("os", "write", {"partial": True}),
    ("os", "fsync", {}),
]
PREVIOUS = [{"i": 0, "prompt": "a wolf"}, {"i": 1, "prompt": "a cat"}]
BIG = {"i": 99, "blob": "y" * 200_000}


def _all_lines_parse(path) -> list[dict]:
    """A strict reader: every line complete and valid JSON (what a reader that is not read_json_lines needs)."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode().splitlines()]


@pytest.mark.parametrize("torn_tail", [False, True], ids=["clean-log", "log-with-torn-tail"])
def test_append_faults_leave_the_log_as_it_was(tmp_path, monkeypatch, torn_tail):
    tried = 0
    for code in FAULTS:
        for module_name, name, kw in APPEND_POINTS:
            log = tmp_path / f"{errno.errorcode[code]}-{name}-{tried}.jsonl"
            for obj in PREVIOUS:
                append_json_line(log, obj)
            if torn_tail:
                with open(log, "ab") as fh:
                    fh.write(b'{"i": 2, "prom')  # an earlier crash mid-line
            before = log.read_bytes()
            with monkeypatch.context() as mp:
                fake = _inject(mp, module_name, name, code, **kw)
                with pytest.raises(OutputWriteError) as info:
                    append_json_line(log, BIG)
            assert fake.fired >= 1, (code, name)  # the fault was really hit (fsync fails again in the cut-back)
            _check_error(info.value, log, code)
            assert info.value.intact and "could not append to" in str(info.value)
            assert log.read_bytes() == before  # no part of the failed line
            assert list(read_json_lines(log)) == PREVIOUS
            if not torn_tail:
                assert _all_lines_parse(log) == PREVIOUS
            # the next append (disk fixed) works and every complete line still parses
            append_json_line(log, {"i": 3})
            assert list(read_json_lines(log)) == PREVIOUS + [{"i": 3}]
            if not torn_tail:
                assert _all_lines_parse(log) == PREVIOUS + [{"i": 3}]
            assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jsonl")) == []
            tried += 1
    assert tried == len(FAULTS) * len(APPEND_POINTS) == 30


def test_append_to_a_missing_log_that_cannot_be_created(tmp_path, monkeypatch):
    log = tmp_path / "results.jsonl"
    _inject(monkeypatch, "os", "open", errno.EROFS)
    with pytest.raises(OutputWriteError, match="read-only filesystem"):
        append_json_line(log, {"i": 0})
    assert not log.exists() and list(read_json_lines(log)) == []


def test_append_other_errors_are_cut_back_and_raised_unchanged(tmp_path, monkeypatch):
    log = tmp_path / "results.jsonl"
    append_json_line(log, PREVIOUS[0])
    before = log.read_bytes()
    _inject(monkeypatch, "os", "write", errno.EIO, partial=True)
    with pytest.raises(OSError) as info:
        append_json_line(log, BIG)
    assert not isinstance(info.value, OutputWriteError)
    assert log.read_bytes() == before


def test_interrupted_append_is_cut_back(tmp_path, monkeypatch):
    log = tmp_path / "results.jsonl"
    append_json_line(log, PREVIOUS[0])
    before = log.read_bytes()
    real_write = os.write

    def half_then_interrupt(fd, data):
        real_write(fd, memoryview(data)[:10])
        raise KeyboardInterrupt

    fake = Faulty(os, "none", 0)
    monkeypatch.setattr(atomicio, "os", fake)
    monkeypatch.setattr(fake, "write", half_then_interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        append_json_line(log, BIG)
    assert log.read_bytes() == before


def test_a_line_another_writer_appended_is_never_cut(tmp_path, monkeypatch):
    """If the log grew by another writer's line between our write and the failed fsync, it is not truncated
    (that would cut the other line): both lines stay, and the error says the log may not be as before."""
    log = tmp_path / "results.jsonl"
    append_json_line(log, PREVIOUS[0])

    def other_writer():
        with open(log, "ab") as fh:
            fh.write(b'{"other": true}\n')

    _inject(monkeypatch, "os", "fsync", errno.ENOSPC, before=other_writer)
    with pytest.raises(OutputWriteError) as info:
        append_json_line(log, {"i": 1})
    assert not info.value.intact and "incomplete line" in str(info.value)
    assert _all_lines_parse(log) == [PREVIOUS[0], {"i": 1}, {"other": True}]


def test_append_keeps_its_behaviour(tmp_path):
    log = tmp_path / "results.jsonl"
    append_json_line(log, {"a": 1})
    with open(log, "ab") as fh:
        fh.write(b'{"torn": ')
    append_json_line(log, {"b": 2})
    assert log.read_bytes() == b'{"a": 1}\n{"torn": \n{"b": 2}\n'
    assert list(read_json_lines(log)) == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError):
        append_json_line(log, {"nan": float("nan")})
    assert list(read_json_lines(log)) == [{"a": 1}, {"b": 2}]
