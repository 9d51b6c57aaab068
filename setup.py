"""setuptools needs this file only to build the cffi extension (gateway._native)."""

from setuptools import setup

setup(cffi_modules=["cffi_build/build_native.py:ffibuilder"])
