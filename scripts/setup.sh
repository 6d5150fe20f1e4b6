#!/usr/bin/env bash
# Installs everything stagesync's demo and tests need on a fresh machine, idempotently:
#   - Debian packages: redis-server (the Redis checkpoint store's tests), python3-venv
#   - .tools/venv with SecantusDB (the MongoDB wire-compatible test server, a separate GPL
#     program run as a process)
#   - optionally (STAGESYNC_NATIVE_SERVER=1) the faster native secantusd-rs in .tools/bin,
#     used by the benchmark when present (about 4 minutes to build on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

SECANTUS_PY_VERSION="0.7.0b3"
SECANTUS_RS_VERSION="0.5.3-beta.196"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ "${STAGESYNC_NATIVE_SERVER:-0}" = 1 ] && ! command -v cmake >/dev/null 2>&1; then need_apt+=(cmake); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt-get)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! .tools/venv/bin/python -c "import importlib.metadata as m; assert m.version('SecantusDB') == '$SECANTUS_PY_VERSION'" >/dev/null 2>&1; then
  echo "setup: installing SecantusDB $SECANTUS_PY_VERSION into .tools/venv"
  mkdir -p .tools
  python3 -m venv .tools/venv
  .tools/venv/bin/pip install -q --disable-pip-version-check "SecantusDB==$SECANTUS_PY_VERSION"
fi

if [ "${STAGESYNC_NATIVE_SERVER:-0}" = 1 ] && [ ! -x .tools/bin/secantusd-rs ]; then
  echo "setup: building secantusd-rs $SECANTUS_RS_VERSION into .tools/bin (a few minutes)"
  # A build cache outside the checkout: a second clone on the same machine reuses it.
  cargo install -q secantus-mdb --version "$SECANTUS_RS_VERSION" --ignore-rust-version --root .tools \
    --target-dir "${STAGESYNC_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagesync/secantus-build}"
fi
echo "setup: ready"
