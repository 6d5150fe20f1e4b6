#!/usr/bin/env bash
# The demo: installs what is missing, builds stagesync, starts a local production and a local
# staging server, seeds sample data, runs `stagesync run` and shows staging after each live
# production change — then stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -q
exec target/release/stagesync demo
