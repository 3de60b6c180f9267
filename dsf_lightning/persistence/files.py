"""Files that are whole or absent: atomic writes (a temporary name, then ``os.replace``) and checked reads.

Every file and folder the project writes for later use (``save_pruned``, the packed export, the ``packed/``
and ``merged/`` folders, ``results.json``, ``config.yaml``, dense weights) goes through :func:`atomic_path`
or :func:`atomic_folder`: an exception, a full disk or a kill while writing leaves the previous version
under the final name, complete, and no partial file there. Readers of ``torch.save`` files go through
:func:`check_torch_file` (:func:`read_torch_file`), which checks the zip container's CRC-32 of every record
first (``torch.load`` does not: a flipped byte in a tensor loads as a wrong value), so a truncated or
corrupted file is a ``ValueError`` naming it, never a partly or wrongly loaded model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_folder", "atomic_path", "check_torch_file", "read_torch_file", "save_torch_file", "write_json",
           "write_text"]


def _scratch(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` to write to; when the block ends normally it replaces ``path``
    (``os.replace``: atomic on POSIX); when it raises (``KeyboardInterrupt`` too) it is removed and ``path``
    keeps what it had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(path, "tmp")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``path`` to fill; when the block ends normally it takes ``path``'s
    place whole (the previous folder is renamed aside, then removed), when it raises it is removed and
    ``path`` keeps its previous contents. Between the two renames ``path`` is briefly absent (POSIX has no
    portable exchange of two folders); it never holds a mix of old and new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _scratch(path, "tmp"), _scratch(path, "old")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path``, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (``default=str``) to ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=2, default=str))


def save_torch_file(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_torch_file(path: str | os.PathLike, what: str = "file") -> None:
    """Check that ``path`` is a whole ``torch.save`` zip file: every record's CRC-32 matches.

    ``what`` names the file's role in errors (``"checkpoint"``, ``"save_pruned file"``). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming ``path`` for one that is truncated,
    corrupted or not a ``torch.save`` zip file. Reads the whole file once.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{what} {path!r} is truncated or not a torch.save file ({e}); nothing was loaded") from e
    if bad is not None:
        raise ValueError(f"{what} {path!r} is corrupted: record {bad!r} fails its CRC-32 check; nothing was loaded")


def read_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` after :func:`check_torch_file`; whatever
    ``torch.load`` still refuses is a ``ValueError`` naming ``path`` too. ``weights_only`` loading never
    executes code from the file."""
    check_torch_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch says of a bad file, the file is the bad input
        raise ValueError(f"{what} {str(path)!r} could not be read ({type(e).__name__}: {str(e)[:300]}); "
                         f"nothing was loaded") from e
