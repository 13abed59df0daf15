#!/usr/bin/env bash
# scripts/demo.sh: run a live fleetgate demo on this machine.
#
#   PostgreSQL (found or started, see scripts/pg.sh) -> cargo build --release
#   -> fleetgate migrate -> fleetgate seed-demo --json -> fleetgate serve (background)
#   -> wait for /ready -> fleetgate simulate (background) -> print how to connect
#   -> run until Ctrl-C, then stop serve, simulate and the private PostgreSQL.
#
# Environment:
#   FLEETGATE_LISTEN              address to serve on (default 127.0.0.1:8080)
#   FLEETGATE_DEMO_RATE           simulated state updates per second (default 20)
#   FLEETGATE_DEMO_READY_TIMEOUT  seconds to wait for /ready (default 60)
#   DATABASE_URL, FLEETGATE_PG_* see scripts/pg.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/pg.sh
source "$ROOT/scripts/pg.sh"

LISTEN=${FLEETGATE_LISTEN:-127.0.0.1:8080}
RATE=${FLEETGATE_DEMO_RATE:-20}
READY_TIMEOUT=${FLEETGATE_DEMO_READY_TIMEOUT:-60}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release/fleetgate
LOG_DIR=$TARGET_DIR/demo
SERVE_LOG=$LOG_DIR/serve.log
SIM_LOG=$LOG_DIR/simulate.log
SERVE_PID=
SIM_PID=

# How to show the binary in copy-paste commands (relative when it is ours).
if [[ $BIN == "$ROOT/"* ]]; then
    BIN_SHOWN=${BIN#"$ROOT/"}
else
    BIN_SHOWN=$BIN
fi

die() {
    fg_err "$*"
    exit 1
}

# Stop a child we started: TERM, up to 10 s grace, then KILL.
# shellcheck disable=SC2317 # only called from the EXIT trap
stop_child() {
    local pid=$1 name=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    fg_log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        fg_warn "$name did not stop within 10s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_child "$SIM_PID" "fleetgate simulate"
    stop_child "$SERVE_PID" "fleetgate serve"
    fg_pg_stop_if_ours
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- address helpers -----------------------------------------------------------

# LISTEN is host:port; to connect, 0.0.0.0 / [::] / empty become loopback.
LISTEN_HOST=${LISTEN%:*}
LISTEN_PORT=${LISTEN##*:}
[[ $LISTEN == *:* && $LISTEN_PORT =~ ^[0-9]+$ ]] ||
    die "FLEETGATE_LISTEN must be HOST:PORT, got '$LISTEN'"
case $LISTEN_HOST in
'' | 0.0.0.0) CONNECT_HOST=127.0.0.1 ;;
'[::]' | '::') CONNECT_HOST='[::1]' ;;
*) CONNECT_HOST=$LISTEN_HOST ;;
esac
ADDR=$CONNECT_HOST:$LISTEN_PORT
TCP_HOST=${CONNECT_HOST#[}
TCP_HOST=${TCP_HOST%]}

tcp_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$TCP_HOST" "$LISTEN_PORT" 2>/dev/null
}

# HTTP status code of GET http://ADDR$1 ("000" if nothing answers).
http_status() {
    local path=$1 code
    if command -v curl >/dev/null 2>&1; then
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$ADDR$path" 2>/dev/null) || true
    else
        # shellcheck disable=SC2016 # expanded by the inner bash
        code=$(timeout 3 bash -c '
            exec 3<>"/dev/tcp/$1/$2" || exit 1
            printf "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" "$3" "$4" >&3
            IFS=" " read -r _ code _ <&3 && printf "%s" "$code"' \
            _ "$TCP_HOST" "$LISTEN_PORT" "$path" "$ADDR" 2>/dev/null) || true
    fi
    printf '%s\n' "${code:-000}"
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    fg_log "waiting for http://$ADDR/ready (up to ${READY_TIMEOUT}s)"
    while ((SECONDS < deadline)); do
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            fg_err "fleetgate serve exited; last lines of $SERVE_LOG:"
            tail -n 30 "$SERVE_LOG" >&2 || true
            return 1
        fi
        [[ $(http_status /ready) == 200 ]] && return 0
        sleep 0.2
    done
    fg_err "http://$ADDR/ready did not answer 200 within ${READY_TIMEOUT}s; last lines of $SERVE_LOG:"
    tail -n 30 "$SERVE_LOG" >&2 || true
    return 1
}

# --- seed-demo JSON --------------------------------------------------------------

SEED_FIELDS=(
    master.login master.password master.session
    sub_user.login sub_user.password sub_user.session
    other.login other.password other.session
    trackers sub_user_trackers other_account_tracker blocked_tracker
)

# Print the SEED_FIELDS of the JSON on stdin, one per line (lists joined by ",").
parse_seed() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c '
import json, sys
raw = sys.stdin.read()
try:
    doc = json.loads(raw)
except ValueError:
    doc = None
    for line in reversed(raw.splitlines()):  # tolerate stray log lines
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
                break
            except ValueError:
                pass
if not isinstance(doc, dict):
    sys.exit("seed-demo --json did not print a JSON object")
for path in sys.argv[1:]:
    v = doc
    for key in path.split("."):
        v = v.get(key) if isinstance(v, dict) else None
    if v is None:
        v = ""
    elif isinstance(v, list):
        v = ",".join(str(x) for x in v)
    print(" ".join(str(v).split()))
' "${SEED_FIELDS[@]}"
    elif command -v jq >/dev/null 2>&1; then
        local f filter=""
        for f in "${SEED_FIELDS[@]}"; do filter+="${filter:+, }.$f"; done
        jq -r "[$filter] | .[] | if . == null then \"\" elif type == \"array\" then map(tostring) | join(\",\") else tostring end"
    else
        fg_err "need python3 or jq to read the seed-demo output"
        return 1
    fi
}

# --- main ------------------------------------------------------------------------------

if ! command -v cargo >/dev/null 2>&1 && [[ -f ${CARGO_HOME:-${HOME:-}/.cargo}/env ]]; then
    # shellcheck source=/dev/null
    source "${CARGO_HOME:-${HOME:-}/.cargo}/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"

if tcp_open; then
    die "something already listens on $LISTEN; stop it or set FLEETGATE_LISTEN=127.0.0.1:PORT"
fi

fg_pg_ensure
export DATABASE_URL

fg_log "cargo build --release"
cargo build --release
[[ -x $BIN ]] || die "$BIN was not built"

fg_log "fleetgate migrate"
"$BIN" migrate

fg_log "fleetgate seed-demo --json"
SEED_JSON=$("$BIN" seed-demo --json)
mapfile -t SEED < <(parse_seed <<<"$SEED_JSON")
if ((${#SEED[@]} != ${#SEED_FIELDS[@]})); then
    printf '%s\n' "$SEED_JSON" >&2
    die "could not read the output of fleetgate seed-demo --json (above)"
fi
M_LOGIN=${SEED[0]} M_PASS=${SEED[1]} M_HASH=${SEED[2]}
S_LOGIN=${SEED[3]} S_PASS=${SEED[4]} S_HASH=${SEED[5]}
O_LOGIN=${SEED[6]} O_PASS=${SEED[7]} O_HASH=${SEED[8]}
TRACKERS=${SEED[9]} SUB_TRACKERS=${SEED[10]}
OTHER_TRACKER=${SEED[11]} BLOCKED_TRACKER=${SEED[12]}
[[ -n $M_HASH && -n $TRACKERS ]] || die "seed-demo --json gave no master session or trackers: $SEED_JSON"
FIRST_TRACKER=${TRACKERS%%,*}

mkdir -p "$LOG_DIR"
fg_log "fleetgate serve --listen $LISTEN (log: $SERVE_LOG)"
"$BIN" serve --listen "$LISTEN" >"$SERVE_LOG" 2>&1 &
SERVE_PID=$!
wait_ready

fg_log "fleetgate simulate --rate $RATE (log: $SIM_LOG)"
"$BIN" simulate --rate "$RATE" >"$SIM_LOG" 2>&1 &
SIM_PID=$!

WS_URL=ws://$ADDR/v2/event/subscription
SUBSCRIBE='{"action":"subscribe","hash":"'$M_HASH'","requests":[{"type":"state","trackers":['$TRACKERS'],"format":"compact"}]}'
SUB_SUBSCRIBE='{"action":"subscribe","hash":"'$S_HASH'","requests":[{"type":"state","trackers":['$SUB_TRACKERS'],"format":"compact"}]}'
DB_SHOWN=$(printf '%q' "$DATABASE_URL")
LINE='================================================================================'

cat <<EOF

$LINE
  fleetgate demo is running  (simulating $RATE state updates/s)
$LINE

  Live page:  http://$ADDR/   (sign in as $M_LOGIN / $M_PASS, or paste a session hash)
  WebSocket:  $WS_URL
  Health:     http://$ADDR/health   http://$ADDR/ready
  Database:   DATABASE_URL=$DATABASE_URL
  Logs:       $SERVE_LOG
              $SIM_LOG

  Demo users (login / password, session hash)
$(printf '    %-9s %-20s %s\n' \
    master "$M_LOGIN / $M_PASS" "$M_HASH" \
    sub-user "$S_LOGIN / $S_PASS" "$S_HASH" \
    other "$O_LOGIN / $O_PASS" "$O_HASH")

  Trackers
    master account:      $TRACKERS
    visible to sub-user: ${SUB_TRACKERS:-none}
    other account:       ${OTHER_TRACKER:-none}   (not visible to $M_LOGIN)
    blocked:             ${BLOCKED_TRACKER:-none}

  Raw events in a browser console (F12, on any page):

ws = new WebSocket("$WS_URL"); ws.onmessage = e => console.log(e.data); ws.onopen = () => ws.send(JSON.stringify({action:"subscribe", hash:"$M_HASH", requests:[{type:"state", trackers:[$TRACKERS], format:"compact"}]}))

  Command line (websocat):

(echo '$SUBSCRIBE'; cat) | websocat $WS_URL

  or: python3 -m websockets $WS_URL   (pip install websockets), then paste:

$SUBSCRIBE

  As the sub-user (sees only trackers ${SUB_TRACKERS:-none}):

$SUB_SUBSCRIBE

  Then, in another terminal (from $ROOT):

    DATABASE_URL=$DB_SHOWN $BIN_SHOWN tracker block $FIRST_TRACKER
    DATABASE_URL=$DB_SHOWN $BIN_SHOWN tracker unblock $FIRST_TRACKER
    DATABASE_URL=$DB_SHOWN $BIN_SHOWN session revoke $M_HASH

$LINE
  Press Ctrl-C to stop (serve, simulate$([[ $FG_PG_OURS == 1 ]] && printf ' and the private PostgreSQL')).
$LINE

EOF

# Run until Ctrl-C, or until serve or simulate dies.
rc=0
wait -n "$SERVE_PID" "$SIM_PID" || rc=$?
if ! kill -0 "$SERVE_PID" 2>/dev/null; then
    fg_err "fleetgate serve exited (status $rc); last lines of $SERVE_LOG:"
    tail -n 30 "$SERVE_LOG" >&2 || true
else
    fg_err "fleetgate simulate exited (status $rc); last lines of $SIM_LOG:"
    tail -n 30 "$SIM_LOG" >&2 || true
fi
exit $((rc == 0 ? 1 : rc))
