#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs every unit and integration test
# against real server processes (SecantusDB by default; a real MongoDB replica set when
# STAGESYNC_TEST_PROD_URI and STAGESYNC_TEST_STAGING_URI are set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --locked "$@"
