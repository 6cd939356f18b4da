"""Compiles the native CPU kernels into a cached shared library (``python3 -m servelm.engine.native.build``).

Two variants of the same source are built: ``avx2`` (AVX2 + FMA + F16C fast paths) and ``portable``
(scalar C++, any x86-64 or other CPU). The library has a plain C ABI and is loaded through ctypes, so it
depends on neither torch's C++ ABI nor its version. Each build is cached under
``$SERVELM_NATIVE_CACHE`` (default ``~/.cache/servelm/native``) by a hash of the source, the compiler
and the flags, so an edited source or another compiler gets its own build.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = ("kernels.cpp", "forward.cpp")  # all hashed; forward.cpp includes kernels.cpp: one translation unit
MAIN_SOURCE = "forward.cpp"
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=off"]
VARIANT_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "portable": [],
}


class NativeBuildError(RuntimeError):
    """The C++ compiler is missing or failed; the message carries its output."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (install g++ or set CXX)")
    return cxx


def cache_dir() -> Path:
    """The folder holding the built libraries."""
    env = os.environ.get("SERVELM_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "servelm" / "native"


def _sources() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / s for s in SOURCES if (here / s).exists()]


def library_path(variant: str) -> Path:
    """Where the library of ``variant`` lives once built: the name carries the hash of source and flags."""
    cxx = _compiler()
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode())
        h.update(src.read_bytes())
    h.update(" ".join([cxx] + BASE_FLAGS + VARIANT_FLAGS[variant]).encode())
    return cache_dir() / f"libservelm_native_{variant}_{h.hexdigest()[:16]}.so"


def build(variant: str, force: bool = False) -> Path:
    """Builds ``variant`` unless its cached library exists; returns the library's path.

    Raises NativeBuildError if the compiler fails.
    """
    out = library_path(variant)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd_base = [_compiler(), *BASE_FLAGS, *VARIANT_FLAGS[variant], str(Path(__file__).resolve().parent / MAIN_SOURCE)]
    t0 = time.perf_counter()
    # build into a temporary name and rename, so a concurrent process never loads a half-written file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cmd_base, "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeBuildError(f"building the {variant} native kernels failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built native CPU kernels (%s) in %.1f s: %s", variant, time.perf_counter() - t0, out)
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    force = "--force" in sys.argv
    for variant in VARIANT_FLAGS:
        t0 = time.perf_counter()
        path = build(variant, force=force)
        print(f"{variant}: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
