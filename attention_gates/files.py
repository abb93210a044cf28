"""Writing files so that neither a reader nor a crash ever sees half of one.

Every file the library, its examples and its benchmarks write (checkpoints, plans, logs, reports,
results) goes through :func:`atomic_write`: the content goes to a hidden temporary file in the
same folder, is flushed to disk (``fsync``), and is renamed over the target in one step
(``os.replace``), after which the folder entry is flushed too. A process killed at any moment
leaves the old file or the new one, never a mixture; at worst it leaves its temporary file,
which :func:`remove_stale_temporaries` finds by name (``.<name>.<pid>.<random>.tmp``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "stale_temporaries", "remove_stale_temporaries"]

Content = Union[bytes, str, Callable[[BinaryIO], object]]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder cannot be opened for reading on some systems (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], content: Content) -> Path:
    """Write ``content`` to ``path`` atomically and durably; returns ``path`` as a :class:`~pathlib.Path`.

    Args:
        path: the file to write (its folder is created if missing; an existing file is replaced).
        content: ``bytes``, ``str`` (written as UTF-8), or a function that writes into the binary
            file object it is given (e.g. ``lambda f: torch.save(state, f)``).

    Raises:
        IsADirectoryError: ``path`` is a folder.
        OSError: the folder cannot be written (the temporary file is removed first).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", "hello").read_text()
        'hello'
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def stale_temporaries(path: Union[str, os.PathLike]) -> list[Path]:
    """The temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-write.

    Only files of processes that no longer run count (the name carries the writer's process id),
    so a live writer's file is never taken for a stale one.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        pid = p.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            stale.append(p)
    return sorted(stale)


def remove_stale_temporaries(path: Union[str, os.PathLike]) -> list[Path]:
    """Delete :func:`stale_temporaries` of ``path``; returns what was deleted."""
    removed = []
    for p in stale_temporaries(path):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True
