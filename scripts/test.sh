#!/usr/bin/env bash
# Passes every test of the workspace on a fresh Debian bookworm machine with a Rust
# toolchain: installs what is missing, then checks formatting, lints and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need. None yet beyond the toolchain; later issues add
# redis-server and clickhouse-server here (installed only when missing).
need_apt=()
if ((${#need_apt[@]})); then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

# rustfmt and clippy ship with the toolchain here; no toolchain can be fetched, so a
# machine without them skips those checks instead of failing.
if cargo fmt --version >/dev/null 2>&1; then
  echo "==> cargo fmt --check"
  cargo fmt --all -- --check
else
  echo "warning: rustfmt missing, formatting not checked" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  echo "==> cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "warning: clippy missing, lints not checked" >&2
fi
echo "==> cargo test"
cargo test --workspace --locked
