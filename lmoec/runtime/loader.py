"""Import an emitted package: write its files once into a content-addressed cache, then import.

The files are those `lmoec compile` writes; importing them (rather than a
parallel in-memory path) means tests and users run exactly the code in
`generated/`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def cache_dir() -> Path:
    return Path(os.environ.get("LMOEC_CACHE", Path.home() / ".cache" / "lmoec"))


def write_package(files: dict[str, str], target: Path, replace: bool = True) -> None:
    """Write all files into a fresh temp dir beside `target`, then rename: all or nothing.

    replace=False is for content-addressed entries: an existing one is kept and our copy dropped, since another
    process (parallel sweep runs) may be importing from it; of two writers racing, the first rename wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
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


def load_package(name: str, files: dict[str, str]) -> ModuleType:
    digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    module_name = f"lmoec_generated_{name.replace('-', '_').replace('.', '_')}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    where = cache_dir() / module_name
    if not (where / "__init__.py").exists():
        write_package(files, where, replace=False)
    spec = importlib.util.spec_from_file_location(module_name, where / "__init__.py", submodule_search_locations=[str(where)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
