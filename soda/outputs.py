"""Writing outputs safely: refuse an unwritable location before the work, never leave half a file.

`check_writable` runs before a command starts its work (a bench can take minutes), so a
read-only folder or a parent that is a file is one `error:` line up front. `atomic_output`
and `write_json_atomic` write through a uniquely named temporary file in the same folder and
rename it into place: a full disk or an interrupt leaves the previous file (or nothing), and
two processes writing the same path never share a temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from soda.errors import UserError

# Errors of the file system, not of the program: the CLI reports them as one `error:` line.
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                      errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.EEXIST, errno.ENOENT, errno.ETXTBSY}


def check_writable(path: str | Path, flag: str, folder: bool = False) -> Path | None:
    """Refuse, before any work, an output `path` (a file, or a folder with `folder=True`) that
    cannot be created: a parent that is a file, a folder that cannot be written in. Returns the
    outermost folder that does not exist yet and will be created with the output (None when
    every folder exists), so the caller can say so: a typo in a folder name is then visible."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    where = p if folder else p.parent
    where = where if str(where) else Path(".")
    created = None
    while not where.exists() and where != where.parent:
        created, where = where, where.parent
    if not where.is_dir():
        raise UserError(f"{flag} {path}: {where} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".soda-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {where} ({e.strerror})") from None
    if p.exists() and not folder and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: the file exists and is read-only")
    return created


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder, same suffix) to write; on success it replaces `path`,
    on any failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None  # say which output failed
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    """JSON via a unique temporary file and a rename: a crash never leaves half a file."""
    text = json.dumps(data, indent=1, sort_keys=False)
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
