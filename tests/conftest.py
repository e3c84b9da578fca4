"""Shared fixtures.

Tests that need KVM use the ``kvm`` fixture (or the ``kvm`` marker). They
fail when /dev/kvm is missing, unless HLPOOL_SKIP_KVM_TESTS=1 is set, in
which case they are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIP_KVM = os.environ.get("HLPOOL_SKIP_KVM_TESTS") == "1"
GUEST_TEST_DIR = Path(__file__).resolve().parent / "guests"


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        from hlpool.kvm.absence import missing_device_error

        return str(missing_device_error())
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no read/write access to /dev/kvm"
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    """On a host without a usable /dev/kvm, the run's summary says so and why, once, above the counts."""
    problem = _kvm_problem()
    if problem is not None:
        terminalreporter.write_line(f"KVM: {problem} "
                                    f"({'the tests that need it are skipped' if SKIP_KVM else 'the tests that need it fail'})")
    elif os.environ.get("HLPOOL_KVM_EMULATED") == "1":
        terminalreporter.write_line("KVM: kvm_amd in a machine emulated by QEMU (scripts/kvm-emulated.sh): real KVM, "
                                    "not PVM, and 10-50x slower than a real host (a test that times a step may fail)")


@pytest.fixture(scope="session")
def kvm() -> None:
    """Require KVM: fail without it (skip only with HLPOOL_SKIP_KVM_TESTS=1)."""
    problem = _kvm_problem()
    if problem is None:
        return
    if SKIP_KVM:
        pytest.skip(f"KVM tests skipped (HLPOOL_SKIP_KVM_TESTS=1): {problem}")
    pytest.fail(f"KVM is required: {problem}. Set HLPOOL_SKIP_KVM_TESTS=1 to skip KVM tests.")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("kvm") and "kvm" not in item.fixturenames:
            item.fixturenames.insert(0, "kvm")


@pytest.fixture(scope="session")
def example():
    """example("echo") -> path of the built example guest."""
    from hlpool.guest.examples import example_path

    return lambda name: str(example_path(name))


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory):
    """test_guest("hostile") -> path of tests/guests/hostile.c built as a guest (cached per session)."""
    from hlpool.guest.build import build_guest

    built: dict[str, str] = {}
    out_dir = tmp_path_factory.mktemp("test-guests")

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(build_guest([GUEST_TEST_DIR / f"{name}.c"], out_dir / f"{name}.elf"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def snapshots(kvm, example):
    """snapshots("echo") -> a Snapshot of the example guest, made once per session."""
    from hlpool import Snapshot

    made: dict[str, object] = {}

    def get(name: str):
        if name not in made:
            made[name] = Snapshot.from_elf(example(name))
        return made[name]

    return get
