"""Pure-Python install by default.

The compiled extension ``edfkern._C`` is built just in time with ninja on first use
(see edfkern/_extension.py). Set ``EDFKERN_BUILD_EXT=1`` to build it ahead of time
instead; that path imports torch, so install with ``pip install --no-build-isolation``
to build against the torch you already have (``EDFKERN_FORCE_CUDA=1`` / ``EDFKERN_NO_CUDA=1``
force or skip the CUDA part; ``EDFKERN_CUDA_ARCHS=80,90`` picks the GPU architectures).

Either way the C++/CUDA sources (top-level ``csrc/``) are copied into the package as
``edfkern/csrc`` so that a regular (non-editable) install can still build just in time.
"""
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_csrc(build_py):
    """Also copy csrc/ to <build>/edfkern/csrc (package data for just-in-time builds)."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "csrc")
        if os.path.isdir(src) and not self.editable_mode:
            dst = os.path.join(self.build_lib, "edfkern", "csrc")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


ext_modules, cmdclass = [], {"build_py": build_py_with_csrc}
if os.environ.get("EDFKERN_BUILD_EXT", "0") == "1":
    # edfkern/build/__init__.py is loaded by path: importing the package here would need torch for nothing.
    spec = importlib.util.spec_from_file_location("edfkern_build", os.path.join(HERE, "edfkern", "build", "__init__.py"))
    edfkern_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edfkern_build)
    ext_modules, ext_cmdclass = edfkern_build.ahead_of_time_extension()
    cmdclass.update(ext_cmdclass)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
