#!/usr/bin/env bash
# The demo: installs what is missing, builds stagesync, starts a local production and a local
# staging server, seeds sample data, runs `stagesync run` and shows staging after each live
# production change — then stops everything. (The same as `cargo xtask demo`.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -q -p stagesync -p xtask
exec target/release/xtask demo
