"""Build of the Cython core; the build picks the platform file (psutil's way)."""
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

if sys.platform.startswith("linux"):
    platform_sources = ["src/c/fmap_linux.c", "src/c/sync_linux.c", "src/c/channel_linux.c",
                        "src/c/rlock_linux.c"]
    libraries = ["pthread"]
else:
    raise SystemExit(f"fmap: no platform layer for {sys.platform} yet (Linux only for now)")

ext = Extension(
    "fmap._fmap",
    sources=["src/_fmap.pyx"] + platform_sources,
    include_dirs=["src"],
    libraries=libraries,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

setup(ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}))
