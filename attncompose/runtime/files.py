"""Files the package writes (tuned files, captures): whole or not at all, and with the
permissions of any new file (what the umask allows), not the private ones of a temporary
file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: writers of one file are not serialised
    fcntl = None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (a killed
    process never leaves half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def can_write_beside(path: str | Path) -> OSError | None:
    """Why no file can be written in the folder of ``path`` (None: one can), found by making
    one (permission bits alone miss a read-only mount, or root's sysfs)."""
    try:
        tempfile.TemporaryFile(dir=Path(path).parent).close()
    except OSError as err:
        return err
    return None


def default_permissions(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have: 0666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask (read by setting it and back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder of ``path`` inside the block (``flock`` on the
    folder itself: no lock file is left beside it), so that processes which read, update and
    write one file (tuning workers sharing an --out) take turns instead of each writing back
    the copy it read before the other wrote."""
    if fcntl is None:
        yield
        return
    fd = os.open(Path(path).parent or ".", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
