"""Pure-Python install by default.

The compiled extension ``edfkern._C`` is built just in time with ninja on first use
(see edfkern/_extension.py). Set ``EDFKERN_BUILD_EXT=1`` to build it ahead of time
instead; that path imports torch, so install with ``pip install --no-build-isolation``
to build against the torch you already have.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("EDFKERN_BUILD_EXT", "0") == "1":
    from edfkern_build import ahead_of_time_extension  # noqa: E402  (lives beside this file)

    ext_modules, cmdclass = ahead_of_time_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
