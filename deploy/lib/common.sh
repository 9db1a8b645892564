# shellcheck shell=bash
# Shared by deploy/up, deploy/status and deploy/down (sourced, not run).
#
# The local topology, all on 127.0.0.1, everything under one state directory:
#
#   $ALLOT_DEPLOY_DIR/
#     deploy.env                    what `up` was run with (base port, binary, catalog)
#     tokens.toml                   API tokens of the enforcers (SHA-256 only, mode 0600)
#     secrets/*.token               the tokens themselves (mode 0600, directory 0700)
#     client.env                    ALLOT_ENDPOINT + ALLOT_TOKEN (admin) for `source`
#     service.env                   ALLOT_ENDPOINT(S) + ALLOT_TOKEN (scope enforce)
#     redis/<port>/                 redis.conf, nodes.conf, appendonlydir/, redis.log, pid
#     clickhouse/                   config.xml, data/, tmp/, logs, pid
#     enforcer-N/                   data/ (soft counters, journal), enforcer.log, pid
#     aggregator-N/                 aggregator.log, pid
#
# Ports are offsets from ALLOT_DEPLOY_BASE_PORT (B, default 7400): see port_* below and
# deploy/README.md. Each process runs with its own directory as working directory; that
# is how `down` and `status` tell our process from an unrelated one that reused a pid.

# shellcheck disable=SC2034  # variables used by the scripts that source this file

DEPLOY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "$DEPLOY_ROOT/.." && pwd)"

ENFORCERS=3
AGGREGATORS=2
REDIS_NODES=6

STATE_DIR="${ALLOT_DEPLOY_DIR:-/var/tmp/allot-deploy}"

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Seconds since the epoch with milliseconds, for timings.
now_ms() { date +%s%3N; }
elapsed() { # elapsed START_MS -> "1.234s"
  local d=$(($(now_ms) - $1))
  printf '%d.%03ds' $((d / 1000)) $((d % 1000))
}

# Values saved by `up` win over the defaults, and the environment wins over both, so
# `status` and `down` find the topology `up` made without repeating its variables.
load_saved() {
  local saved="$STATE_DIR/deploy.env" line key value
  [[ -f $saved ]] || return 0
  while IFS= read -r line; do
    [[ $line =~ ^([A-Z_]+)=(.*)$ ]] || continue
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    case $key in
    ALLOT_DEPLOY_BASE_PORT | ALLOT_BIN | ALLOT_DEPLOY_CATALOG | ALLOT_DEPLOY_APPENDFSYNC)
      if [[ -z ${!key:-} ]]; then printf -v "$key" '%s' "$value"; fi
      ;;
    esac
  done <"$saved"
}

set_ports() {
  BASE_PORT="${ALLOT_DEPLOY_BASE_PORT:-7400}"
  [[ $BASE_PORT =~ ^[0-9]+$ ]] || die "ALLOT_DEPLOY_BASE_PORT must be a number, not '$BASE_PORT'"
  # Redis Cluster also listens on port + 10000 (the cluster bus).
  ((BASE_PORT >= 1024 && BASE_PORT + 60 + 10000 <= 65535)) ||
    die "ALLOT_DEPLOY_BASE_PORT must be between 1024 and 55475 (got $BASE_PORT)"
  CH_HTTP_PORT=$((BASE_PORT + 40))
  CH_TCP_PORT=$((BASE_PORT + 41))
  REDIS_SEED="redis-cluster://127.0.0.1:$(port_redis 1)"
  CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
}
port_enforcer() { echo $((BASE_PORT + 10 + $1)); }      # gRPC, enforcer-N: B+11..B+13
port_enforcer_http() { echo $((BASE_PORT + 20 + $1)); } # HTTP, enforcer-N: B+21..B+23
port_aggregator_http() { echo $((BASE_PORT + 30 + $1)); } # HTTP, aggregator-N: B+31, B+32
port_redis() { echo $((BASE_PORT + 50 + $1)); }         # Redis node N: B+51..B+56

redis_dir() { echo "$STATE_DIR/redis/$(port_redis "$1")"; }

# ---------------------------------------------------------------- processes

# The pid in FILE if that process is alive and runs in directory DIR, else nothing.
live_pid() { # live_pid PIDFILE DIR
  local pid cwd
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || return 1
  [[ $cwd == "$(cd "$2" 2>/dev/null && pwd -P)" ]] || return 1
  echo "$pid"
}

# Starts a command detached from this terminal (own session, stdin from /dev/null,
# stdout and stderr appended to LOG) in DIR, and writes its pid to PIDFILE. ENV_FILE
# (may be empty) is read first, so secrets are not on the command line.
spawn() { # spawn DIR PIDFILE LOG ENV_FILE -- CMD...
  local dir=$1 pidfile=$2 logfile=$3 envfile=$4
  shift 5
  (
    cd "$dir" || exit 1
    # shellcheck disable=SC2016  # expanded by the inner shell
    setsid bash -c '
      pidfile=$1 envfile=$2; shift 2
      if [[ -n $envfile ]]; then set -a; . "$envfile"; set +a; fi
      echo $$ >"$pidfile"
      exec "$@"' _ "$pidfile" "$envfile" "$@" </dev/null >>"$logfile" 2>&1 &
    # Wait until the pid file is written, so that the caller can rely on it.
    for _ in $(seq 100); do
      [[ -s $pidfile ]] && exit 0
      sleep 0.02
    done
  )
}

# Is something listening on 127.0.0.1:PORT?
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# HTTP status code of GET URL ("000" when nothing answers).
http_code() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- health

redis_cli() { # redis_cli N ARGS...
  local n=$1
  shift
  timeout 5 redis-cli -h 127.0.0.1 -p "$(port_redis "$n")" "$@"
}

# One line about Redis node N; returns 0 when it is in a healthy cluster.
redis_health() {
  local n=$1 info state role link
  info=$(redis_cli "$n" cluster info 2>/dev/null | tr -d '\r') || {
    echo "not answering"
    return 1
  }
  state=$(sed -n 's/^cluster_state://p' <<<"$info")
  role=$(redis_cli "$n" role 2>/dev/null | head -1 | tr -d '\r')
  if [[ $role == slave ]]; then
    link=$(redis_cli "$n" info replication 2>/dev/null | tr -d '\r' | sed -n 's/^master_link_status://p')
    echo "replica, cluster_state:$state, master_link:$link"
    [[ $state == ok && $link == up ]]
  else
    echo "$role, cluster_state:$state"
    [[ $state == ok && $role == master ]]
  fi
}

clickhouse_health() {
  local body
  body=$(curl -s --max-time 2 "$CLICKHOUSE_URL/ping" 2>/dev/null) || true
  if [[ $body == "Ok." ]]; then
    echo "/ping Ok."
  else
    echo "/ping not answering"
    return 1
  fi
}

# Enforcer N: /readyz on its HTTP port when the node serves it, else a gRPC call
# (`allot peers`, scope support:read), which also shows that it gossips with the others.
enforcer_health() {
  local n=$1 code peers how
  code=$(http_code "http://127.0.0.1:$(port_enforcer_http "$n")/readyz")
  case $code in
  200) how="/readyz 200" ;;
  404) how="grpc" ;; # a node without /readyz (older build): its HTTP port serves webhooks only
  000) how="grpc" ;;
  *)
    echo "/readyz $code"
    return 1
    ;;
  esac
  peers=$(ALLOT_TOKEN=$(secret status) timeout 5 "$ALLOT_BIN" --endpoint \
    "http://127.0.0.1:$(port_enforcer "$n")" --json peers 2>/dev/null) || {
    echo "gRPC not answering${how:+ ($how)}"
    return 1
  }
  local live
  live=$(count_live_peers "$peers")
  echo "$how, $live/$((ENFORCERS - 1)) peers live"
  ((live >= ENFORCERS - 1))
}

# How many peers in `allot peers --json` output are live (the JSON has no nested
# objects with a "live" key other than the peers').
count_live_peers() {
  grep -o '"live": *true' <<<"$1" | wc -l
}

# Aggregator N: /readyz when it serves HTTP, else its heartbeat in Redis
# (al:aggregators: member "<id>/<nonce>", score the last heartbeat in Redis ms).
aggregator_health() {
  local n=$1 code members now age best=""
  code=$(http_code "http://127.0.0.1:$(port_aggregator_http "$n")/readyz")
  if [[ $code == 200 ]]; then
    echo "/readyz 200"
    return 0
  elif [[ $code != 000 && $code != 404 ]]; then
    echo "/readyz $code"
    return 1
  fi
  # Redis TIME: seconds, then microseconds.
  now=$(redis_cli 1 time 2>/dev/null | tr -d '\r' | paste -sd' ') || true
  if [[ $now =~ ^([0-9]+)\ ([0-9]+)$ ]]; then
    now=$((BASH_REMATCH[1] * 1000 + BASH_REMATCH[2] / 1000))
  else
    now=""
  fi
  members=$(redis_cli 1 -c zrange al:aggregators 0 -1 withscores 2>/dev/null | tr -d '\r') || true
  [[ -n $now && -n $members ]] || {
    echo "no heartbeat in Redis yet"
    return 1
  }
  local member score
  while IFS= read -r member && IFS= read -r score; do
    if [[ $member == "aggregator-$n/"* ]]; then
      age=$((now - ${score%.*}))
      if [[ -z $best ]] || ((age < best)); then best=$age; fi
    fi
  done <<<"$members"
  if [[ -z $best ]]; then
    echo "no heartbeat in Redis yet"
    return 1
  fi
  echo "heartbeat ${best}ms ago"
  ((best < 30000))
}

secret() { cat "$STATE_DIR/secrets/$1.token" 2>/dev/null; }
