"""Atomic output directories: write into a temp dir beside the target, rename at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import LowrankAttnError


def check_writable_target(out: str | os.PathLike, overwrite: bool) -> None:
    out = Path(out)
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(out.resolve()):
        raise LowrankAttnError(f"output {str(out) or repr('')} is the current directory or one of its parents; "
                               "give --out a new directory name")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LowrankAttnError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # fail before any work, not at the end
        raise LowrankAttnError(f"cannot create {out}: {parent} is not a directory; choose another --out")
    try:  # and where nothing can be created (permissions, a read-only or special file system) too
        os.rmdir(tempfile.mkdtemp(prefix=".lowrank-attn-probe-", dir=parent))
    except OSError as e:
        raise LowrankAttnError(f"cannot create {out}: {e.strerror or e} ({parent}); choose another --out") from e


@contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_writable_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise LowrankAttnError(f"cannot create {out}: {e.strerror or e} ({e.filename or out.parent}); "
                               "choose another --out") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result should be as readable as any new dir
    try:
        yield tmp
        for p in tmp.rglob("*"):  # some writers (safetensors) create 0600 files: make them as readable as the dir
            if p.is_file() and not p.is_symlink():
                os.chmod(p, (p.stat().st_mode | 0o666) & ~umask & 0o777)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:  # the old checkpoint goes back where it was, not left hidden beside it
                os.replace(old, out)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # --overwrite of a file
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LowrankAttnError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


