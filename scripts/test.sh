#!/usr/bin/env bash
# Passes every test of the workspace on a fresh Debian bookworm machine with a Rust
# toolchain: installs what is missing, then checks formatting, lints and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the integration tests run for real (installed only when missing):
# redis-server and redis-cli (Debian's 7.0) for the Redis store, standalone and Cluster;
# util-linux's setpriv lets the harness tie servers to the test process.
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  echo "==> installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The package starts a system redis-server on 6379 where systemd runs; the tests use their
# own servers on free ports and do not need it.

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
