"""Writing files and directories atomically, and refusing outputs that would destroy something.

Every output is written into a uniquely named temporary sibling, ``.NAME.partial-PID-START-*``
(a file: ``.NAME.tmp-PID-START-*``), renamed into place only when complete; an existing output
is replaced only under ``force`` and only when it is a statecast output, swapped atomically
(``renameat2`` exchange where the kernel has it, else moved aside and put back on failure).
The leftovers of killed runs are removed by the next run in the same directory
(:func:`statecast.checkpoints.store.clean_stale`). Environment failures while writing (disk
full, permission, read-only file system) are :class:`StatecastError` naming the path and the
reason, with nothing left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import StatecastError
from .store import META_FILE, clean_stale, temp_prefix

# The marker an export without its own statecast.json (``export --format hf``) carries, so that
# ``--force`` knows the directory is a statecast output (see :func:`is_statecast_output`).
EXPORT_MARKER = ".statecast-export.json"


def _write_all(fd: int, buf) -> None:
    view = memoryview(buf).cast("B")
    try:
        while len(view):
            n = os.write(fd, view)
            view = view[n:]
    finally:
        view.release()


_TEMP_PART = re.compile(r"(^|/)\.([^/]+)\.(?:partial|old|tmp)-\d+-\d+-[^/]+")


def _final_name(path: object) -> str:
    """A path as the user knows it: our temporary names replaced by the names they become."""
    return _TEMP_PART.sub(r"\1\2", str(path))


def _os_error(e: OSError, path: Path) -> StatecastError:
    """An environment failure (disk full, permission, read-only file system...) in one line,
    naming the output path (and the file within it, where that says more)."""
    reason = e.strerror or str(e) or type(e).__name__
    where = _final_name(path)
    inner = _final_name(e.filename) if e.filename else None
    if inner and inner != where and inner.startswith(where + "/"):
        where = inner
    return StatecastError(f"cannot write {where}: {reason}")


def check_writable(directory: Path, name: str | None = None) -> None:
    """Fail early (before minutes of work) where nothing can be written into ``directory`` (the
    error names ``directory / name``, the file to be written): a read-only file system, no
    permission. (A full disk shows only when the data is written.)"""
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix("probe", "tmp"), dir=directory)
    except OSError as e:
        raise _os_error(e, Path(directory) / name if name else Path(directory)) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = 0o022
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
    return _UMASK


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a uniquely named temporary file in the same directory and
    ``os.replace``: readers see the old file or the new one, never a partial one, and
    concurrent writers never collide. Failures are one-line errors; nothing is left behind."""
    path = Path(path)
    data = text.encode("utf-8")
    clean_stale(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name, "tmp"), dir=path.parent)
    except OSError as e:
        raise _os_error(e, path) from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _os_error(e, path) from None
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_statecast_output(path: Path) -> bool:
    """A directory statecast wrote, which ``--force`` may replace: one holding a
    ``statecast.json`` (a unified model, an ONNX export) or an :data:`EXPORT_MARKER` (an HF
    export), or an empty directory. Never anything else (a parent directory, a checkpoint)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / META_FILE).is_file() or (path / EXPORT_MARKER).is_file():
        return True
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def _relation(out: Path, src: Path, inside_ok: bool) -> str | None:
    real_out, real_src = out.resolve(), src.resolve()
    if real_out == real_src:
        return "is"
    if real_src.is_relative_to(real_out):
        return "contains"
    if not inside_ok and real_src.is_dir() and real_out.is_relative_to(real_src):
        return "is inside"
    return None


def check_output(out: Path, force: bool, sources: Sequence[Path] = (), keep: Sequence[Path] = ()) -> Path:
    """Refuse an output path before any work: one under a regular file; one that is, contains
    or is inside a ``source`` (the checkpoint being converted), or is or contains a ``keep``
    path (the model being exported, whose own subdirectories are fine); an existing one
    without ``force``; and under ``force``, one that is not a statecast output. Returns it
    absolute."""
    out = Path(out).absolute()
    for p, inside_ok in [(Path(s), False) for s in sources] + [(Path(k), True) for k in keep]:
        rel = _relation(out, p, inside_ok)
        if rel:
            raise StatecastError(f"output path {out} {rel} the source {p}; choose an output outside it")
    anc = out.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if os.path.lexists(anc) and not anc.is_dir():
        raise StatecastError(f"cannot create {out}: {anc} is not a directory")
    if os.path.lexists(out):
        if not force:
            raise StatecastError(f"output path {out} already exists (pass --force to replace it)")
        if not is_statecast_output(out):
            raise _not_ours(out)
    return out


def _not_ours(out: Path) -> StatecastError:
    return StatecastError(f"refusing to replace {out} with --force: it is not a statecast output (it has no {META_FILE} "
                          f"or {EXPORT_MARKER}); remove it yourself or choose another output path")


# renameat2(2): swap two paths atomically, or rename without replacing (Linux; None elsewhere)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2_fn: object = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True when done; False when this system or file system does not support it."""
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (AttributeError, OSError, TypeError):
            _renameat2_fn = False
    if not _renameat2_fn:
        return False
    at_fdcwd = -100
    if _renameat2_fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with FileExistsError if ``dst`` exists (even an empty directory,
    which a plain rename would silently replace)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    _rename(src, dst)


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``out``. Without ``force``, an ``out`` that appeared
    meanwhile is an error and is left alone. With it, a statecast output is swapped out
    atomically (or, where the system cannot swap, moved aside and put back on failure)."""
    if not os.path.lexists(out):
        try:
            _rename_noreplace(tmp, out)
            return
        except FileExistsError:
            if not force:
                raise StatecastError(f"output path {out} appeared while writing it; it was left as it is "
                                     f"(pass --force to replace it)") from None
    elif not force:
        raise StatecastError(f"output path {out} appeared while writing it; it was left as it is "
                             f"(pass --force to replace it)")
    if not is_statecast_output(out):
        raise _not_ours(out)
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output (a stale name if we die here)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "old"), dir=out.parent))
    old.rmdir()
    _rename(out, old)
    try:
        _rename_noreplace(tmp, out)
    except BaseException:
        try:
            _rename(old, out)
        except OSError as e:
            raise StatecastError(f"replacing {out} failed and the old output could not be put back: it is in {old} "
                                 f"({e.strerror})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False, sources: Sequence[Path] = (), keep: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only on success.

    :func:`check_output` first (``sources``: what is being converted, which the output may
    not be, contain or sit inside; ``keep``: what it may not be or contain). Leftovers of
    killed runs beside ``out`` are removed. An OSError with an errno while writing (disk
    full, permission...) becomes a one-line :class:`StatecastError`; on any failure the
    temporary directory is removed and an existing output is untouched."""
    out = check_output(out, force, sources, keep)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "partial"), dir=out.parent))
    except OSError as e:
        raise _os_error(e, out) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an output gets the usual mode
        yield tmp
        _install(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno is None:  # not an environment failure: a bug or an injected fault, as it is
            raise
        raise _os_error(e, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
