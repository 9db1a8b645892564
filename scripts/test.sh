#!/usr/bin/env bash
# Passes every test of the workspace on a fresh Debian bookworm machine with a Rust
# toolchain: installs what is missing, then checks formatting, lints and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the integration tests run for real (installed only when missing):
# redis-server and redis-cli (Debian's 7.0) for the Redis store, standalone and Cluster;
# clickhouse-server (Debian's 18.16) for the aggregator; python3 with venv for current
# ClickHouse (below); util-linux's setpriv lets the harness tie servers to the test process.
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v clickhouse-server >/dev/null 2>&1 || need_apt+=(clickhouse-server)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  echo "==> installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The packages start a system redis-server (6379) and clickhouse-server (8123, 9000) where
# systemd runs; the tests use their own servers on free ports and do not need them.

# Current ClickHouse, in-process: the PyPI package chdb-core in a virtualenv where the
# aggregator's tests look for it (they create it themselves if it is missing, and fail if
# they cannot), so that every migration and rollup query also runs on today's ClickHouse.
chdb_venv="${CARGO_TARGET_DIR:-target}/tmp/venv-chdb"
if ! "$chdb_venv/bin/python" -c 'import chdb' >/dev/null 2>&1; then
  echo "==> installing chdb-core into $chdb_venv"
  python3 -m venv "$chdb_venv"
  "$chdb_venv/bin/pip" install -q chdb-core
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

# deploy/: lint what cannot run here (systemd units, Dockerfile, Kubernetes manifests,
# scripts), then bring the whole local topology up, use it, restart it and take it down
# once, on free ports in a temporary directory (about a minute; ALLOT_DEPLOY_SMOKE=0 skips).
deploy_start=$SECONDS
# The debug binary cargo test just built for enforcer's integration tests: no second,
# release build (a build with other features could rebuild much of the workspace).
export ALLOT_BIN="${CARGO_TARGET_DIR:-target}/debug/allot"
[[ -x $ALLOT_BIN ]] || cargo build --locked -q -p enforcer --bin allot
echo "==> deploy/lint"
deploy/lint
if [[ ${ALLOT_DEPLOY_SMOKE:-1} != 0 ]]; then
  echo "==> deploy/smoke"
  deploy/smoke
fi
echo "==> deploy checks took $((SECONDS - deploy_start))s"
