"""Crash-safe writes: everything lands under a temporary name first and is renamed into place.

A rename within one filesystem is atomic, so a reader (or a rerun after Ctrl-C) sees either the
previous complete file/folder or the new complete one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Terminated(SystemExit):
    """SIGTERM arrived outside a Lightning fit (see ``sigterm_unwinds``); exit status 143 as the signal's own."""

    def __init__(self) -> None:
        super().__init__(143)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's pre-emption, ``kill``) unwinds the process like Ctrl-C does, raising
    ``Terminated``: the ``finally`` blocks run, so a half-written temporary file or folder is removed instead of left
    behind (a model-sized ``.model.tmp-*`` folder). Inside a Lightning fit, Lightning's own handler, which it composes
    with this one, is the one installed: this one then leaves the decision to it (it stops at the step's end and, in a
    single process, saves a checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unwritable(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """``(the folder that refuses, why)`` when ``folder`` cannot be created or written to, else None: found before
    hours of work, not at the first write after them. Permissions are not enough to tell (root may write anywhere
    by them, yet not under ``/proc`` or on a read-only mount), so this tries: it creates the missing folders and a
    temporary file in ``folder``, and removes everything it created."""
    folder = Path(folder).absolute()
    where = next(p for p in (folder, *folder.parents) if p.exists())
    where = where if where.is_dir() else where.parent
    if not os.access(where, os.W_OK):
        return where, "read-only or no permission"
    for _attempt in range(3):  # another rank starting beside this one may remove a folder its own probe created
        error = _write_probe(folder)
        if error is None:
            return None
    return where, f"cannot create {str(error.filename or folder)!r}: {error.strerror or error}"


def _write_probe(folder: Path) -> OSError | None:
    created: list[Path] = []
    try:
        for missing in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
            missing.mkdir()
            created.append(missing)
        probe = _tmp_sibling(folder / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
        return None
    except OSError as err:
        return err
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (byte-stable for equal inputs)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even for an instant, would give
    a file another thread creates meanwhile the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_permissions(folder: Path) -> None:
    """Give the files in ``folder`` the permissions a plain write gives (0644 under the usual umask): safetensors
    writes its files 0600, so the other users of a shared machine could not read a saved model."""
    mask = _umask()
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    if path.exists() and not overwrite:
        from gaqprune.errors import GaqpruneError

        raise GaqpruneError(f"output folder {str(path)!r} already exists; pass --overwrite true to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        _default_permissions(tmp)
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path).with_suffix(".png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
