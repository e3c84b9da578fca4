"""Builds the Cython extensions; everything else is in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

# The contracts the extensions are compiled against. Listed as depends so that
# `build_ext --inplace` rebuilds an extension when one of them changes.
GUEST_INCLUDE = "hlpool/guest/sdk/include"  # hlpool_abi.h: the guest/host contract
KVM_PXD = "hlpool/kvm/kvm.pxd"  # Cython declarations of <linux/kvm.h>
GUEST_ABI_PXD = "hlpool/guest_abi.pxd"  # Cython declarations of hlpool_abi.h
LINUX_KVM_H = "/usr/include/linux/kvm.h"  # the kernel's header (linux-libc-dev)
SYSTEM_HEADERS = [LINUX_KVM_H] if os.path.exists(LINUX_KVM_H) else []

extensions = [
    Extension(
        "hlpool._mapping",
        ["hlpool/_mapping.pyx"],
        include_dirs=[GUEST_INCLUDE],
        depends=[KVM_PXD, GUEST_ABI_PXD, f"{GUEST_INCLUDE}/hlpool_abi.h", *SYSTEM_HEADERS],
        extra_compile_args=["-O2"],
    ),
    Extension(
        "hlpool.memory._dirty",
        ["hlpool/memory/_dirty.pyx"],
        include_dirs=[GUEST_INCLUDE],
        depends=[KVM_PXD, GUEST_ABI_PXD, f"{GUEST_INCLUDE}/hlpool_abi.h", *SYSTEM_HEADERS],
        extra_compile_args=["-O2"],
    ),
    Extension(
        "hlpool.kvm._vcpu_run",
        ["hlpool/kvm/_vcpu_run.pyx"],
        include_dirs=["hlpool/kvm"],
        depends=[KVM_PXD, "hlpool/kvm/run_support.h", *SYSTEM_HEADERS],
        extra_compile_args=["-O2"],
        libraries=["rt"],
    ),
    Extension("hlpool.guest._msgcheck", ["hlpool/guest/_msgcheck.pyx"], extra_compile_args=["-O2"]),
    Extension("hlpool.pool._slots", ["hlpool/pool/_slots.pyx"], extra_compile_args=["-O2"]),
    Extension("hlpool.snapshot._capture", ["hlpool/snapshot/_capture.pyx"], extra_compile_args=["-O2"]),
]

setup(ext_modules=cythonize(extensions, language_level=3))
