"""Small file helpers: atomic writes (a kill never leaves half a file) and JSON files.

No heavy imports: used by the CLI, the data cache, run directories and reports alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str | None = None) -> None:
    """Call ``write(tmp_path)`` then rename to ``path``, so a crash never leaves a partial file.

    The temporary file sits beside ``path`` (same file system, so the rename is atomic), is hidden
    (leading dot) and ends in ``suffix`` (default: ``path``'s) so writers that pick a format from
    the suffix behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: object, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically (non-JSON values through ``str``); a file that
    already holds exactly that text is left as it is (its modification time too)."""
    text = json.dumps(data, indent=indent, default=str)
    try:
        if Path(path).read_text() == text:
            return
    except OSError:
        pass
    write_text(path, text)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; an empty dict when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
