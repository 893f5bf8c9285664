"""Writing files so that a reader (or a resumed run) never finds a half-written one, with the mode the umask gives."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Every temporary name ends with this, so that leftovers of an interrupted write are recognisably ours.
TEMPORARY_SUFFIX = ".faithdiff-tmp"


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: POSIX offers no read-only query)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Gives ``path`` the mode a plain ``open``/``mkdir`` would have (``mkstemp`` and ``mkdtemp`` use 0600/0700)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def _owner_tag() -> str:
    # Host and process id: a later run can tell a leftover of a dead process from a write still in progress.
    return f"{socket.gethostname()}-{os.getpid()}"


def temporary_name(target: Path) -> Path:
    """A hidden, unique name beside ``target`` that :func:`remove_leftovers` recognises."""
    return target.with_name(f".{target.name}.{_owner_tag()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _is_stale(name: str) -> bool:
    """Whether a temporary name of ours belongs to a process of this host that no longer runs."""
    parts = name[: -len(TEMPORARY_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3:
        return False
    host, _, pid = parts[1].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not _process_alive(int(pid))


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Removes what interrupted writes of ours left in ``folder`` (only our temporary names, only of dead processes
    on this host); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX) and _is_stale(path.name):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target``: write to it inside the block; it becomes ``target`` (one rename, with the
    mode the umask gives) when the block ends without error, and is removed otherwise. ``target``'s folder is
    created if missing, and an error about the temporary name names ``target`` instead."""
    target = Path(target)
    temporary = temporary_name(target)
    try:
        # A new file's folder is made as the commands make their output folders.
        target.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        apply_umask(temporary)
        os.replace(temporary, target)
    except OSError as error:
        if error.filename not in (str(temporary), temporary):
            raise
        # The temporary name is ours: the user is told of the file they asked for.
        raise type(error)(error.errno, error.strerror, os.fspath(target)) from error
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``target`` through :func:`atomic_path`."""
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")
