"""Import an emitted package: write its files once into a content-addressed cache, then import.

The files are those `lmoec compile` writes; importing them (rather than a
parallel in-memory path) means tests and users run exactly the code in
`generated/`.

An entry is trusted for what it holds, not for its name: the cache is owner-only, an entry is compared
with the files it must hold before every import (a mismatch is said and the entry rewritten), and the
modules run the emitted text itself, never a .pyc beside it.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

_NOT_IDENTIFIER = re.compile(r"\W", re.ASCII)


def cache_dir() -> Path:
    """The package cache ($LMOEC_CACHE, default ~/.cache/lmoec), made owner-only (0o700): nobody else writes what we import."""
    path = Path(os.environ.get("LMOEC_CACHE", Path.home() / ".cache" / "lmoec"))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = path.stat()
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        raise PermissionError(f"the package cache {path} belongs to another user: set LMOEC_CACHE to a directory of your own")
    if status.st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_package(files: dict[str, str], target: Path, replace: bool = True) -> None:
    """Write all files into a fresh temp dir beside `target`, then rename: all or nothing.

    replace=False is for content-addressed entries: an existing one is kept and our copy dropped, since another
    process (parallel sweep runs) may be importing from it; of two writers racing, the first rename wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if target.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            _rmtree(old)
        elif not target.exists():
            tmp.rename(target)
    except OSError:
        if replace or not (target / "__init__.py").exists():
            raise
    finally:
        _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _differing_file(where: Path, files: dict[str, str]) -> Optional[str]:
    """The first file in which the entry `where` differs from `files` (missing, extra, not a plain file, other
    bytes); None if it holds exactly them. __pycache__ is left out: the loader never reads it."""
    if where.is_symlink() or not where.is_dir():
        return where.name
    present = {p.name for p in where.iterdir()} - {"__pycache__"}
    for name in sorted(present | set(files)):
        path = where / name
        if name not in files or path.is_symlink() or not path.is_file() or path.read_bytes() != files[name].encode("utf-8"):
            return name
    return None


class _EmittedSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the emitted text itself: a .pyc in the entry is never read (nor written), and the file on disk,
    checked equal to that text, serves only readers (inspect, tracebacks, Triton's kernel parser)."""

    def __init__(self, fullname: str, path: str, text: str):
        super().__init__(fullname, path)
        self.text = text

    def get_code(self, fullname: str):
        return self.source_to_code(self.text, self.path)


def load_package(name: str, files: dict[str, str]) -> ModuleType:
    digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    module_name = f"lmoec_generated_{_NOT_IDENTIFIER.sub('_', name)}_{digest}"  # a name from a checkpoint can hold "/"
    if module_name in sys.modules:
        return sys.modules[module_name]
    where = cache_dir() / module_name
    if not os.path.lexists(where):
        write_package(files, where, replace=False)  # of racing writers (parallel sweep runs) the first wins: same files
    elif (differing := _differing_file(where, files)) is not None:
        print(f"lmoec: warning: the cached package {where} does not hold what it must ({differing} differs): "
              "writing it again", file=sys.stderr)
        write_package(files, where)
    if (differing := _differing_file(where, files)) is not None:
        raise ImportError(f"the cached package {where} changed while it was written ({differing}); not importing it")

    def loader(fullname: str, path: str) -> _EmittedSourceLoader:
        return _EmittedSourceLoader(fullname, path, files[os.path.basename(path)])

    # the package's submodules are found through this finder: only the entry's .py files, loaded as above
    sys.path_importer_cache[str(where)] = importlib.machinery.FileFinder(str(where), (loader, [".py"]))
    init = str(where / "__init__.py")
    spec = importlib.util.spec_from_file_location(module_name, init, loader=loader(module_name, init), submodule_search_locations=[str(where)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
