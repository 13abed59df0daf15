#!/usr/bin/env bash
# notify-cost.sh: what does the `fleetgate` NOTIFY cost an ingest pipeline writing tracker_states?
#
# Compares, on the server of $DATABASE_URL (default postgres://postgres@127.0.0.1:5432):
#   none   no trigger at all on tracker_states (the floor: a plain batched upsert)
#   stamp  only the BEFORE ROW trigger stamping change_no (no NOTIFY)
#   stmt   the migration as shipped: stamp + one NOTIFY per statement (AFTER STATEMENT triggers)
#   row    stamp + one NOTIFY per row (AFTER ROW trigger: pg_notify('fleetgate', 's|' || id))
# Each kind gets its own scratch database built from migrations/*.sql and seeded with 10,000
# trackers that all have a state row. While pgbench runs, one listener session per database
# executes LISTEN fleetgate and stays idle between tiny queries, so it drains the notification
# queue as a live gateway would (without a listener, NOTIFY is nearly free); it counts what it
# receives. pgbench writes batches of 1, 100 and 1000 trackers per statement with the unnest
# upsert of docs/ingest.md, one statement per transaction, each client on its own slice of
# trackers (no row-lock contention between clients), random offset inside the slice.
#
# Prints a Markdown table on stdout (progress on stderr). Runtime about 2 minutes with defaults.
#
# Environment: DATABASE_URL, CLIENTS (4), THREADS (2), DURATION (8 s per run), WARMUP (2 s per
# database), BATCHES ("1 100 1000"), KINDS ("none stamp stmt row"), TRACKERS (10000),
# ROUNDS (1; with more, every cell is the median of the rounds, and tx/s shows min-max too: use
# it on a busy machine), KEEP=1 keeps the scratch databases.
set -euo pipefail

DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432}
CLIENTS=${CLIENTS:-4}
THREADS=${THREADS:-2}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
BATCHES=${BATCHES:-"1 100 1000"}
KINDS=${KINDS:-"none stamp stmt row"}
TRACKERS=${TRACKERS:-10000}
ROUNDS=${ROUNDS:-1}
KEEP=${KEEP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/notify-cost.XXXXXX")
PREFIX="fg_ingest_cost_$$"
SLICE=$((TRACKERS / CLIENTS))
LISTENER_PIDS=()

log() { printf '%s\n' "$*" >&2; }

# The URL of database $1 on the same server (same user, host, port and query parameters).
url_for() {
    local base=${DATABASE_URL%%\?*} query=""
    [[ $DATABASE_URL == *\?* ]] && query="?${DATABASE_URL#*\?}"
    local scheme=${base%%://*} rest=${base#*://}
    printf '%s://%s/%s%s' "$scheme" "${rest%%/*}" "$1" "$query"
}

ADMIN_URL=$(url_for postgres)
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 "$ADMIN_URL" "$@"; }
psql_db() { local db=$1; shift; psql -X -q -v ON_ERROR_STOP=1 "$(url_for "$db")" "$@"; }

cleanup() {
    local pid kind
    rm -f "$WORK"/listen.*.on            # listener loops end, their psql sees EOF and exits
    sleep 0.2
    for pid in "${LISTENER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ $KEEP != 1 ]]; then
        for kind in $KINDS; do
            psql_admin -c "DROP DATABASE IF EXISTS ${PREFIX}_$kind WITH (FORCE)" 2>/dev/null || true
        done
    else
        log "kept databases ${PREFIX}_*"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in psql pgbench; do
    command -v "$tool" >/dev/null || { log "$tool not found on PATH"; exit 1; }
done
(( SLICE >= 1000 )) || { log "TRACKERS / CLIENTS must be at least the largest batch (1000)"; exit 1; }

# --- scratch databases ---------------------------------------------------------------------------

setup_db() {
    local kind=$1 db="${PREFIX}_$1" f
    log "creating $db"
    psql_admin -c "CREATE DATABASE $db"
    for f in "$ROOT"/migrations/*.sql; do psql_db "$db" -f "$f"; done
    case $kind in
        none)
            psql_db "$db" -c 'DROP TRIGGER tracker_states_stamp ON tracker_states' \
                -c 'DROP TRIGGER tracker_states_notify_ins ON tracker_states' \
                -c 'DROP TRIGGER tracker_states_notify_upd ON tracker_states' ;;
        stamp)
            psql_db "$db" -c 'DROP TRIGGER tracker_states_notify_ins ON tracker_states' \
                -c 'DROP TRIGGER tracker_states_notify_upd ON tracker_states' ;;
        stmt) ;;
        row)
            psql_db "$db" <<'SQL'
DROP TRIGGER tracker_states_notify_ins ON tracker_states;
DROP TRIGGER tracker_states_notify_upd ON tracker_states;
CREATE FUNCTION tracker_states_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleetgate', 's|' || NEW.tracker_id);
    RETURN NULL;
END $$;
CREATE TRIGGER tracker_states_notify_row AFTER INSERT OR UPDATE ON tracker_states
    FOR EACH ROW EXECUTE FUNCTION tracker_states_notify_row();
SQL
            ;;
        *) log "unknown kind $kind"; exit 1 ;;
    esac
    psql_db "$db" <<SQL
INSERT INTO users (id, login, time_zone) VALUES (1, 'bench', 'Europe/Berlin');
INSERT INTO trackers (id, account_id, source_id, label)
    SELECT g, 1, 100000 + g, 'tracker ' || g FROM generate_series(1, $TRACKERS) g;
INSERT INTO tracker_states (tracker_id, lat, lng, last_update)
    SELECT g, 14.33, -90.99, now() FROM generate_series(1, $TRACKERS) g;
VACUUM ANALYZE;
SQL
}

# --- pgbench script --------------------------------------------------------------------------------

# One statement per transaction: the batched unnest upsert of docs/ingest.md. The arrays are built
# server-side because pgbench cannot bind arrays; a pipeline binds them as parameters instead.
write_script() {
    local b=$1
    cat > "$WORK/upsert_$b.sql" <<SQL
\set off (:client_id % $CLIENTS) * $SLICE + random(0, $SLICE - $b)
INSERT INTO tracker_states (tracker_id, lat, lng, heading, speed, gps_updated, last_update,
                            connection_status, movement_status)
SELECT * FROM unnest(
    ARRAY(SELECT generate_series(:off + 1, :off + $b))::bigint[],
    ARRAY(SELECT 14 + random() FROM generate_series(1, $b))::float8[],
    ARRAY(SELECT -91 + random() FROM generate_series(1, $b))::float8[],
    ARRAY(SELECT (random() * 360)::int FROM generate_series(1, $b))::smallint[],
    ARRAY(SELECT (random() * 90)::int FROM generate_series(1, $b))::integer[],
    array_fill(now(), ARRAY[$b])::timestamptz[],
    array_fill(now(), ARRAY[$b])::timestamptz[],
    array_fill('active'::text, ARRAY[$b]),
    array_fill('moving'::text, ARRAY[$b]))
ON CONFLICT (tracker_id) DO UPDATE SET
    lat = EXCLUDED.lat, lng = EXCLUDED.lng, heading = EXCLUDED.heading, speed = EXCLUDED.speed,
    gps_updated = EXCLUDED.gps_updated, last_update = EXCLUDED.last_update,
    connection_status = EXCLUDED.connection_status, movement_status = EXCLUDED.movement_status;
SQL
}

# --- listener --------------------------------------------------------------------------------------

# Start a session that LISTENs on fleetgate and runs a trivial query every 50 ms; between queries
# the backend is idle and forwards queued notifications, which psql prints and we count.
listen_start() {
    local db=$1 tag=$2
    : > "$WORK/listen.$tag.on"
    (
        set +o pipefail
        { echo 'LISTEN fleetgate;'
          while [[ -e "$WORK/listen.$tag.on" ]]; do echo 'SELECT 1;'; sleep 0.05; done
        } | psql -X -q -t -A "$(url_for "$db")" 2>&1 | grep -c '^Asynchronous notification' \
            > "$WORK/listen.$tag.count" || true
    ) &
    LISTENER_PIDS+=($!)
    LAST_LISTENER=$!
    sleep 0.3
}

# Stop the listener started last; sets NOTIFIES to the number of notifications it received.
listen_stop() {
    local tag=$1
    sleep 0.5
    rm -f "$WORK/listen.$tag.on"
    wait "$LAST_LISTENER" || true
    NOTIFIES=$(cat "$WORK/listen.$tag.count" 2>/dev/null || echo 0)
}

# --- runs ------------------------------------------------------------------------------------------

# Run pgbench on database kind $1 with batch $2 for $3 seconds; sets TPS and NOTIFIES.
run_bench() {
    local kind=$1 b=$2 secs=$3 db="${PREFIX}_$1" tag="$1_$2_$3" out
    psql_db "$db" -c 'VACUUM tracker_states'
    psql_db "$db" -c 'CHECKPOINT' 2>/dev/null || true
    listen_start "$db" "$tag"
    out=$(pgbench -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$secs" -f "$WORK/upsert_$b.sql" \
          "$(url_for "$db")" 2>&1) || { log "$out"; exit 1; }
    listen_stop "$tag"
    TPS=$(awk '/^tps = / { print $3; exit }' <<<"$out")
    local failed
    failed=$(awk '/number of failed transactions/ { print $5; exit }' <<<"$out")
    [[ -z $failed || $failed == 0 ]] || log "warning: $kind batch $b: $failed failed transactions"
}

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)
for kind in $KINDS; do setup_db "$kind"; done
for b in $BATCHES; do write_script "$b"; done

if (( WARMUP > 0 )); then
    for kind in $KINDS; do
        log "warm-up $kind"
        run_bench "$kind" 100 "$WARMUP"
    done
fi

declare -A TPS_LIST NOTIFY_SUM TPS_OF RANGE_OF
for ((round = 1; round <= ROUNDS; round++)); do
    for b in $BATCHES; do
        for kind in $KINDS; do        # kinds interleaved per batch size: noise hits all alike
            log "round $round/$ROUNDS, batch $b, $kind: ${DURATION}s"
            run_bench "$kind" "$b" "$DURATION"
            TPS_LIST[$kind,$b]+="$TPS "
            NOTIFY_SUM[$kind,$b]=$(( ${NOTIFY_SUM[$kind,$b]:-0} + NOTIFIES ))
        done
    done
done
for key in "${!TPS_LIST[@]}"; do
    sorted=$(tr ' ' '\n' <<<"${TPS_LIST[$key]}" | grep . | sort -g)
    TPS_OF[$key]=$(awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }' <<<"$sorted")
    RANGE_OF[$key]=$(awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }' <<<"$sorted")
done
ELAPSED=$(( $(date +%s) - START ))

# Share of HOT (heap-only) updates per database over the whole run: an update that changes an
# indexed column (change_no is indexed) cannot be HOT and must insert into every index.
declare -A HOT_OF
for kind in $KINDS; do
    HOT_OF[$kind]=$(psql -X -A -t "$(url_for "${PREFIX}_$kind")" -c "SELECT coalesce(round(100.0 *
        n_tup_hot_upd / nullif(n_tup_upd, 0)), 0) FROM pg_stat_user_tables WHERE relname = 'tracker_states'")
done

# --- report ----------------------------------------------------------------------------------------

server=$(psql -X -A -t "$ADMIN_URL" -c "SELECT current_setting('server_version')")
settings=$(psql -X -A -t "$ADMIN_URL" -c "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name)
    FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'shared_buffers', 'wal_level')")
base_kind=none
[[ " $KINDS " == *" none "* ]] || base_kind=${KINDS%% *}

echo "notify-cost: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, PostgreSQL $server ($settings),"
echo "load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a); pgbench -M prepared -c $CLIENTS -j $THREADS -T $DURATION, $ROUNDS round(s), $TRACKERS trackers, runtime ${ELAPSED}s"
echo
notify_base=stamp
[[ " $KINDS " == *" stamp "* && $base_kind != stamp ]] || notify_base=""
if [[ -n $notify_base ]]; then
    echo "| trackers per statement | trigger | transactions/s | tracker rows/s | rows/s vs $base_kind | rows/s vs $notify_base | NOTIFYs received/s |"
    echo "|---:|---|---:|---:|---:|---:|---:|"
else
    echo "| trackers per statement | trigger | transactions/s | tracker rows/s | rows/s vs $base_kind | NOTIFYs received/s |"
    echo "|---:|---|---:|---:|---:|---:|"
fi
for b in $BATCHES; do
    for kind in $KINDS; do
        range=""
        (( ROUNDS > 1 )) && range=" (${RANGE_OF[$kind,$b]})"
        nbase=""
        [[ -n $notify_base ]] && nbase=${TPS_OF[$notify_base,$b]}
        awk -v b="$b" -v k="$kind" -v tps="${TPS_OF[$kind,$b]}" -v base="${TPS_OF[$base_kind,$b]}" \
            -v nbase="$nbase" -v n="${NOTIFY_SUM[$kind,$b]}" \
            -v d="$((DURATION * ROUNDS))" -v range="$range" 'BEGIN {
            vs = (nbase == "") ? "" : sprintf(" %.2f |", tps / nbase)
            printf "| %d | %s | %.0f%s | %.0f | %.2f |%s %.0f |\n",
                   b, k, tps, range, tps * b, tps / base, vs, n / d }'
    done
done
echo
printf 'HOT updates of tracker_states over the run:'
for kind in $KINDS; do printf ' %s %s%%' "$kind" "${HOT_OF[$kind]}"; done
echo
if [[ " $KINDS " == *" stmt "* && " $KINDS " == *" row "* ]]; then
    echo
    echo "| trackers per statement | per-statement ÷ per-row (rows/s) |"
    echo "|---:|---:|"
    for b in $BATCHES; do
        awk -v b="$b" -v s="${TPS_OF[stmt,$b]}" -v r="${TPS_OF[row,$b]}" \
            'BEGIN { printf "| %d | %.2f |\n", b, s / r }'
    done
fi
