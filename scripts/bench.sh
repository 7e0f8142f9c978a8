#!/usr/bin/env bash
# tokenrelay vs no proxy vs nginx, side by side in one run (benches/bench.rs).
# Installs nginx and redis-server (Debian), oha (crates.io) and LiteLLM's proxy (PyPI, in
# target/bench/litellm) if missing, raises the open-file limit for
# the 1,000-stream and 10,000-request measurements, builds in release mode, and runs.
#   scripts/bench.sh           full run, rewrites docs/benchmarks.md
#   scripts/bench.sh --quick   3-second smoke run, prints only
#   scripts/bench.sh --keys    only the key-pool rows (1, 1,000, 1,000 with limits), printed
#   scripts/bench.sh --usage   only the accounting rows (not metered, metered, metered with
#                              clients and limits; saturation and SSE first event), printed
#   scripts/bench.sh --serve   start the fakes, tokenrelay and nginx, print their addresses
#                              and pids, and wait (for perf / valgrind / oha by hand)
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
command -v nginx >/dev/null || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends nginx >/dev/null; }
command -v redis-server >/dev/null || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends redis-server >/dev/null; }
command -v oha >/dev/null || cargo install --locked oha
# LiteLLM's proxy, the peer users would otherwise pick, pinned, in a venv of its own.
[ -x target/bench/litellm/bin/litellm ] || {
  python3 -m venv target/bench/litellm
  target/bench/litellm/bin/pip install --quiet --disable-pip-version-check 'litellm[proxy]==1.108.7'
}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --locked --bin tokenrelay
cargo bench --locked --bench bench -- "$@"
