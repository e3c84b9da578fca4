"""The hlpool command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HLPOOL = [sys.executable, "-m", "hlpool.cli"]


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([*HLPOOL, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"hlpool {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


GUEST_SOURCE = r"""
#include <hlpool.h>
#include <stdio.h>
#include <string.h>
#include "shout.h"

static hl_value shout(const hl_args *a) {
    size_t len;
    const char *s = hl_arg_str(a, 0, &len);
    char buf[256];
    snprintf(buf, sizeof buf, "%s%s", s, SUFFIX);
    for (char *p = buf; *p; p++) if (*p >= 'a' && *p <= 'z') *p -= 32;
    return hl_str(buf);
}

int hl_main(void) { hl_export("shout", shout); return 0; }
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "shout.c").write_text(GUEST_SOURCE)
    (d / "include").mkdir()
    (d / "include" / "shout.h").write_text('#ifndef SUFFIX\n#define SUFFIX "?"\n#endif\n')
    out = d / "shout.elf"
    run("guest", "build", str(d / "shout.c"), "-I", str(d / "include"), "-D", 'SUFFIX="!"', "-O", "s",
        "-o", str(out))
    assert out.exists() and os.access(out, os.X_OK)
    return out


@pytest.mark.kvm
def test_build_snapshot_inspect_and_run(guest, tmp_path):
    assert json.loads(run("run", str(guest), "shout", "hello").stdout) == "HELLO!"
    snap = tmp_path / "shout.hlsnap"
    out = run("snapshot", "build", str(guest), "-o", str(snap), "--heap-size", "4M").stdout
    assert "1 exports" in out
    text = run("snapshot", "inspect", str(snap)).stdout
    assert "exports    shout" in text and "layers" in text and "regions" in text
    info = json.loads(run("snapshot", "inspect", "--json", str(snap)).stdout)
    assert info["exports"] == ["shout"] and info["memory"]["heap"] == 4 << 20
    assert len(info["layers"]) == 1 and info["layers"][0]["file"] == str(snap)
    assert json.loads(run("run", str(snap), "shout", "again").stdout) == "AGAIN!"


def test_build_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("int hl_main(void) { return undefined_thing; }\n")
    proc = run("guest", "build", str(bad), "-o", str(tmp_path / "bad.elf"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("hlpool: error: compiling") and "undefined_thing" in proc.stderr
    proc = run("guest", "build", str(tmp_path / "missing.c"), "-o", str(tmp_path / "x.elf"), check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    nomain = tmp_path / "nomain.c"
    nomain.write_text("int x;\n")
    proc = run("guest", "build", str(nomain), "-o", str(tmp_path / "nomain.elf"), check=False)
    assert proc.returncode == 1 and "hl_main" in proc.stderr


@pytest.mark.kvm
def test_run_errors(guest, tmp_path):
    proc = run("run", str(guest), "nope", check=False)
    assert proc.returncode == 1 and "unknown function 'nope'" in proc.stderr
    proc = run("run", str(guest), "shout", "1", check=False)
    assert proc.returncode == 1 and "argument 0: expected str, got int" in proc.stderr
    junk = tmp_path / "junk.hlsnap"
    junk.write_bytes(b"HLSNAP\r\n" + b"\0" * 10)
    proc = run("run", str(junk), "shout", check=False)
    assert proc.returncode == 1 and "hlpool: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("snapshot", "inspect", str(tmp_path / "missing.hlsnap"), check=False)
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_usage_errors_and_help():
    proc = run("snapshot", "build", "x.elf", check=False)
    assert proc.returncode == 2 and "--output" in proc.stderr
    proc = run("snapshot", "build", "x.elf", "-o", "y", "--heap-size", "lots", check=False)
    assert proc.returncode == 2 and "invalid size" in proc.stderr
    for args in (["--help"], ["guest", "build", "--help"], ["snapshot", "inspect", "--help"], ["run", "--help"]):
        assert run(*args).stdout.startswith("usage: hlpool")
