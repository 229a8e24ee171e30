"""Build script: the package plus the C++ SVD extension ``pica_kernels._C`` (csrc/).

The extension must be compiled against the exact torch it will run with (the
C++ ABI is not stable across torch builds), so build WITHOUT pip's build
isolation, after torch is installed:

    pip install --no-build-isolation -e .          # the Makefile does this
    python setup.py build_ext --inplace            # developers

With isolation pip would install a second, unpinned torch (a multi-GB CUDA
build) into a throw-away build env and compile against that. If torch cannot
be imported at build time, or ``PICA_NO_EXT=1``, the package installs without
the extension and pica_kernels.svd falls back to its pure-torch twin
(``pica_kernels.svd.backend()`` says which runs).

CPU part (csrc/svd.cpp): always. CUDA part (csrc/svd_cuda.cpp + csrc/*.cu):
only when torch was built with CUDA and nvcc is found (``PICA_NO_CUDA=1``
skips it).
"""

import glob
import os
import shutil

from setuptools import setup


def _extensions():
    if os.environ.get("PICA_NO_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("pica_kernels: torch not importable at build time; building without the C++ SVD extension")
        return [], {}
    cxx = ["-O3"]  # BuildExtension adds the -std= flag this torch needs
    sources = ["csrc/svd.cpp"]
    nvcc_ok = torch.version.cuda is not None and (
        cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    )
    if nvcc_ok and not os.environ.get("PICA_NO_CUDA"):
        sources += ["csrc/svd_cuda.cpp", *sorted(glob.glob("csrc/*.cu"))]
        ext = cpp_extension.CUDAExtension(
            "pica_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            define_macros=[("PICA_WITH_CUDA", "1")],
        )
    else:
        ext = cpp_extension.CppExtension("pica_kernels._C", sources, extra_compile_args={"cxx": cxx})
    # ninja: parallel, incremental; falls back to distutils if absent.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
