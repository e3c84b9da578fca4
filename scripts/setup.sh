#!/usr/bin/env bash
# Installs everything hlpool needs on a fresh Debian/Ubuntu machine:
# system packages (compiler, musl, libcap headers, libseccomp), a virtualenv in .venv,
# hlpool itself (editable, with its Cython extensions) and the example guests.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# libseccomp2: the seccomp filter of pool workers (pyseccomp loads libseccomp.so.2 at run time);
# iproute2: `ss`, with which the Ray tests check that nothing listens beyond 127.0.0.1
PACKAGES=(gcc g++ make libcap-dev musl-dev musl-tools libseccomp2 iproute2)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if ((${#missing[@]})); then
    echo "setup: installing system packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.hlpool-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ -n "$(find hlpool -name '*.px[di]' -newer "$stamp" -print -quit)" ]; then
    echo "setup: installing hlpool into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test,ray]'
    touch "$stamp"
fi
# The editable install compiles the extensions once; rebuild them if a .pyx changed since.
.venv/bin/python setup.py -q build_ext --inplace >/dev/null

echo "setup: building the example guests"
.venv/bin/hlpool guest examples >/dev/null
echo "setup: building the interpreter guests (QuickJS and Lua, from pinned PyPI sdists)"
.venv/bin/hlpool guest interpreters >/dev/null
echo "setup: done"
