"""Builds the Cython extensions; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("hlpool._mapping", ["hlpool/_mapping.pyx"], extra_compile_args=["-O2"]),
    Extension(
        "hlpool.kvm._vcpu_run",
        ["hlpool/kvm/_vcpu_run.pyx"],
        include_dirs=["hlpool/kvm"],
        extra_compile_args=["-O2"],
        libraries=["rt"],
    ),
]

setup(ext_modules=cythonize(extensions, language_level=3))
