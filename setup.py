"""Build of the Cython kernel mlsem.model._core and the data layer's passes mlsem.data._prep.

OpenMP is used when the compiler accepts -fopenmp (gcc, clang with libomp);
otherwise the kernel is built serial.  Set MLSEM_NO_OPENMP=1 to force a serial
build.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _openmp_flags():
    if os.environ.get("MLSEM_NO_OPENMP") or sys.platform == "win32":
        return [], []
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return [], []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(d, "t")],
                               capture_output=True)
        except OSError:
            return [], []
        if r.returncode == 0:
            return ["-fopenmp"], ["-fopenmp"]
    return [], []


cflags, lflags = _openmp_flags()
ext = Extension(
    "mlsem.model._core",
    ["mlsem/model/_core.pyx"],
    include_dirs=[np.get_include()],
    extra_compile_args=["-O3"] + cflags,
    extra_link_args=lflags,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
# the data layer's linear passes over integer ids (mlsem.data.prepfast; serial)
prep = Extension(
    "mlsem.data._prep",
    ["mlsem/data/_prep.pyx"],
    include_dirs=[np.get_include()],
    extra_compile_args=["-O3"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
setup(ext_modules=cythonize([ext, prep], compiler_directives={"language_level": "3"}))
