#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every unit and integration test
# against real server processes (SecantusDB by default; a real MongoDB replica set when
# STAGESYNC_TEST_PROD_URI and STAGESYNC_TEST_STAGING_URI are set).
# The native secantusd-rs server is built once (about 4 minutes) because the burst and chaos
# tests need its speed; STAGESYNC_NATIVE_SERVER=0 skips that and runs everything on secantusd-py.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGESYNC_NATIVE_SERVER="${STAGESYNC_NATIVE_SERVER:-1}" bash scripts/setup.sh
cargo test --locked "$@"
