# shellcheck shell=bash
# scripts/pg.sh: find a PostgreSQL server for fleetgate, or start a private one.
#
# This is a library, meant to be sourced:
#
#   source scripts/pg.sh
#   trap fg_pg_stop_if_ours EXIT     # or call it from your own cleanup
#   fg_pg_ensure                     # exports DATABASE_URL
#   ...
#   fg_pg_stop_if_ours               # stops the private cluster only if we started it
#
# fg_pg_ensure tries, in this order:
#   1. $DATABASE_URL, if it is set and the server answers;
#   2. 127.0.0.1:5432, if user "postgres" can log in without a password (trust),
#      -> DATABASE_URL=postgres://postgres@127.0.0.1:5432/fleetgate
#   3. a private, throwaway cluster built from the system's binaries
#      (/usr/lib/postgresql/*/bin, installing Debian's `postgresql` package with
#      apt-get if they are missing), living in target/pg/:
#        target/pg/data   data directory       target/pg/sock   unix socket dir
#        target/pg/log    server log           target/pg/lock   flock(1) lock
#      listening on 127.0.0.1:${FLEETGATE_PG_PORT:-54329}, trust auth,
#      -> DATABASE_URL=postgres://postgres@127.0.0.1:54329/fleetgate
#      If that cluster is already running (another script started it) it is
#      reused, and then fg_pg_stop_if_ours leaves it alone.
#
# initdb/postgres refuse to run as root. When root, the private cluster runs as
# the `postgres` system user (created if missing), so every directory above
# target/pg must be traversable by that user. The repository root is not
# chmod-ed: if the path is not traversable (or too long for a unix socket
# path), the cluster goes to /tmp/fleetgate-pg-$UID instead (a warning says so).
#
# The private cluster is for tests and demos only: it runs with fsync=off.
#
# Environment:
#   DATABASE_URL                 used if reachable (step 1)
#   FLEETGATE_PG_FORCE_PRIVATE=1 skip steps 1 and 2, always use the private cluster
#   FLEETGATE_PG_PORT            private cluster port (default 54329)
#   FLEETGATE_PG_DIR             private cluster directory (default <repo>/target/pg)
#   FLEETGATE_PG_BINDIR          PostgreSQL server binaries (default: newest
#                                /usr/lib/postgresql/*/bin)
#   FLEETGATE_PG_DB              database name put in DATABASE_URL (default fleetgate)
#
# After fg_pg_ensure: FG_PG_MODE is url|system|private, FG_PG_OURS is 1 if this
# shell started the private cluster. Functions return non-zero on failure and
# never call `exit`, so the library is safe with or without `set -euo pipefail`.

if [[ -n ${FG_PG_SH_LOADED:-} ]]; then
    return 0
fi
FG_PG_SH_LOADED=1

FG_PG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
FG_PG_OURS=${FG_PG_OURS:-0}
FG_PG_MODE=${FG_PG_MODE:-}
FG_PG_DIR=${FG_PG_DIR:-}
FG_PG_BIN=${FG_PG_BIN:-}
FG_PG_OWNER=${FG_PG_OWNER:-}

fg_log() { printf '==> %s\n' "$*" >&2; }
fg_warn() { printf '==> warning: %s\n' "$*" >&2; }
fg_err() { printf '==> error: %s\n' "$*" >&2; }

# Hide the password part of a URL: postgres://u:secret@h/db -> postgres://u:***@h/db
fg_pg_redact() {
    local url=$1
    if [[ $url =~ ^([^:/]+://[^:/@]+):[^@]*@(.*)$ ]]; then
        printf '%s:***@%s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
    else
        printf '%s\n' "$url"
    fi
}

# --- tools -------------------------------------------------------------------

# Directory with the server binaries (initdb, pg_ctl, postgres), newest version
# first; optional $1 = major version wanted. Prints nothing if none is found.
fg_pg__find_bindir() {
    local want=${1:-} d best=""
    if [[ -n ${FLEETGATE_PG_BINDIR:-} && -z $want ]]; then
        printf '%s\n' "$FLEETGATE_PG_BINDIR"
        return 0
    fi
    if [[ -n $want ]]; then
        d=/usr/lib/postgresql/$want/bin
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && printf '%s\n' "$d"
        return 0
    fi
    while IFS= read -r d; do
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && best=$d
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    if [[ -z $best ]] && command -v pg_ctl >/dev/null 2>&1; then
        # Non-Debian layouts: binaries on PATH.
        d=$(dirname "$(command -v pg_ctl)")
        [[ -x $d/initdb && -x $d/postgres ]] && best=$d
    fi
    [[ -n $best ]] && printf '%s\n' "$best"
    return 0
}

# Major version of the server binaries in FG_PG_BIN (e.g. 15).
fg_pg__bin_major() {
    local v
    v=$("$FG_PG_BIN/postgres" --version 2>/dev/null) || return 1
    [[ $v =~ ([0-9]+)(\.[0-9]+)? ]] || return 1
    printf '%s\n' "${BASH_REMATCH[1]}"
}

# Path of a client tool (psql, pg_isready): PATH first, then the server bindir.
fg_pg__tool() {
    local name=$1 d
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return 0
    fi
    for d in ${FG_PG_BIN:+"$FG_PG_BIN"} $(compgen -G '/usr/lib/postgresql/*/bin' | sort -rV); do
        if [[ -x $d/$name ]]; then
            printf '%s\n' "$d/$name"
            return 0
        fi
    done
    return 1
}

# "host port" of a postgres:// URL (default localhost 5432).
fg_pg__hostport() {
    local rest=${1#*://} host port=5432
    rest=${rest%%[/?]*}
    rest=${rest##*@}
    if [[ $rest == \[* ]]; then # [v6]:port
        host=${rest%%]*}
        host=${host#[}
        [[ $rest == *]:* ]] && port=${rest##*]:}
    else
        host=${rest%%:*}
        [[ $rest == *:* ]] && port=${rest#*:}
    fi
    printf '%s %s\n' "${host:-localhost}" "${port:-5432}"
}

# Does something accept TCP connections at host port?
fg_pg__tcp_open() {
    local -a to=()
    command -v timeout >/dev/null 2>&1 && to=(timeout 3)
    # shellcheck disable=SC2016 # expanded by the inner bash
    "${to[@]}" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Is there a PostgreSQL server answering at this URL? (Any answer counts, even
# "database does not exist": `fleetgate migrate` creates the database.)
fg_pg__reachable() {
    local url=$1 tool out hp
    if tool=$(fg_pg__tool pg_isready); then
        "$tool" -q -t 3 -d "$url" >/dev/null 2>&1
        return
    fi
    if tool=$(fg_pg__tool psql); then
        out=$(PGCONNECT_TIMEOUT=3 "$tool" -w -X -Atq -d "$url" -c 'select 1' 2>&1) && return 0
        [[ $out == *"does not exist"* ]]
        return
    fi
    hp=$(fg_pg__hostport "$url")
    # shellcheck disable=SC2086 # "host port" on purpose
    fg_pg__tcp_open $hp
}

# Does user postgres get into 127.0.0.1:PORT without a password?
fg_pg__trusted() {
    local port=$1 tool url="postgres://postgres@127.0.0.1:$1/postgres"
    if tool=$(fg_pg__tool psql); then
        env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=3 \
            "$tool" -w -X -Atq -d "$url" -c 'select 1' >/dev/null 2>&1
        return
    fi
    # No psql: we can only check that a server answers.
    if fg_pg__reachable "$url"; then
        fg_warn "no psql: cannot check that 127.0.0.1:$port allows trust auth, assuming it does"
        return 0
    fi
    return 1
}

# --- running things as the cluster owner ---------------------------------------

# Run a command as root (for apt-get): directly, or with sudo.
fg_pg__as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        fg_err "need root (or sudo) to run: $*"
        return 1
    fi
}

# Run a command as the owner of the private cluster: ourselves, or the
# `postgres` system user when we are root (initdb/postgres refuse root).
# Runs from / so that an untraversable current directory does not matter.
fg_pg__as_owner() {
    if ((EUID != 0)); then
        (cd / && "$@")
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u "$FG_PG_OWNER" -- "$@")
    elif command -v setpriv >/dev/null 2>&1; then
        (cd / && setpriv --reuid="$FG_PG_OWNER" --regid="$FG_PG_OWNER" --init-groups -- "$@")
    else
        (cd / && su -s /bin/bash "$FG_PG_OWNER" -c "$(printf '%q ' "$@")")
    fi
}

# Install Debian's PostgreSQL server package (only if no binaries are found).
fg_pg__install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        fg_err "PostgreSQL server binaries not found and apt-get is not available;"
        fg_err "install PostgreSQL (initdb, pg_ctl, postgres) or set DATABASE_URL"
        return 1
    fi
    fg_log "installing PostgreSQL server binaries: apt-get install postgresql"
    fg_pg__as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o DPkg::Lock::Timeout=300 update >&2 || return 1
    fg_pg__as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends postgresql >&2 ||
        return 1
}

# When root: make sure the `postgres` system user exists (the Debian package
# creates it; create a plain system user if it is absent).
fg_pg__ensure_owner() {
    if ((EUID != 0)); then
        FG_PG_OWNER=$(id -un)
        return 0
    fi
    FG_PG_OWNER=postgres
    id -u postgres >/dev/null 2>&1 && return 0
    fg_log "creating system user postgres"
    if command -v useradd >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin postgres
    else
        adduser --system --group --no-create-home --home /nonexistent postgres
    fi
}

# --- private cluster location ------------------------------------------------------

# Can the cluster owner create files in dir (and reach it through its parents)?
fg_pg__owner_can_use() {
    local dir=$1
    if ((EUID == 0)); then
        chown "$FG_PG_OWNER:" "$dir" 2>/dev/null || return 1
    fi
    fg_pg__as_owner test -d "$dir" -a -w "$dir" -a -x "$dir" 2>/dev/null
}

# Sets FG_PG_DIR: $FLEETGATE_PG_DIR, else <repo>/target/pg, else (not usable by
# the owner, or socket path too long) /tmp/fleetgate-pg-$UID.
fg_pg__pick_dir() {
    local cand fallback=/tmp/fleetgate-pg-$UID port=${FLEETGATE_PG_PORT:-54329} owner
    if [[ -n ${FLEETGATE_PG_DIR:-} ]]; then
        mkdir -p "$FLEETGATE_PG_DIR" || return 1
        FG_PG_DIR=$(cd "$FLEETGATE_PG_DIR" && pwd -P)
        if ! fg_pg__owner_can_use "$FG_PG_DIR"; then
            fg_err "FLEETGATE_PG_DIR=$FG_PG_DIR is not usable by user $FG_PG_OWNER"
            return 1
        fi
        return 0
    fi

    cand=$FG_PG_ROOT/target/pg
    # A unix socket path is limited to 107 bytes: <dir>/sock/.s.PGSQL.<port>
    if ((${#cand} + 16 + ${#port} > 100)); then
        fg_warn "$cand is too long for a unix socket path, using $fallback"
    elif mkdir -p "$cand" 2>/dev/null && fg_pg__owner_can_use "$cand"; then
        FG_PG_DIR=$cand
        return 0
    else
        fg_warn "user $FG_PG_OWNER cannot reach $cand (a parent directory is not" \
            "traversable, e.g. chmod o+x it), using $fallback"
        rmdir "$cand" 2>/dev/null || true
    fi

    if [[ -L $fallback ]]; then
        fg_err "$fallback is a symlink, refusing to use it"
        return 1
    fi
    mkdir -m 0700 "$fallback" 2>/dev/null || [[ -d $fallback ]] || return 1
    owner=$(stat -c %u "$fallback")
    if [[ $owner != "$EUID" && $owner != "$(id -u "$FG_PG_OWNER")" ]]; then
        fg_err "$fallback belongs to someone else (uid $owner), refusing to use it"
        return 1
    fi
    fg_pg__owner_can_use "$fallback" || {
        fg_err "$fallback is not usable by user $FG_PG_OWNER"
        return 1
    }
    FG_PG_DIR=$fallback
}

# --- private cluster ---------------------------------------------------------------

# Port of the private cluster if it is running (from postmaster.pid), else fail.
fg_pg__private_running_port() {
    local data=$FG_PG_DIR/data port
    [[ -f $data/postmaster.pid ]] || return 1
    fg_pg__as_owner "$FG_PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1 || return 1
    port=$(sed -n 4p "$data/postmaster.pid" 2>/dev/null)
    [[ $port =~ ^[0-9]+$ ]] || return 1
    printf '%s\n' "$port"
}

# Quote a value for postgresql.conf.
fg_pg__conf_quote() {
    local v=${1//\\/\\\\}
    printf "'%s'" "${v//\'/\'\'}"
}

# Under the lock: reuse a running private cluster, or initdb (once) and start it.
# Closes file descriptor $1 (the lock) in the commands that could outlive us.
fg_pg__private_start() {
    local lockfd=$1 data=$FG_PG_DIR/data sock=$FG_PG_DIR/sock log=$FG_PG_DIR/log
    local port=${FLEETGATE_PG_PORT:-54329} ver bindir running_port conf

    if [[ -s $data/PG_VERSION ]]; then
        # Use the binaries matching an existing data directory.
        ver=$(<"$data/PG_VERSION")
        if [[ $(fg_pg__bin_major) == "$ver" ]]; then
            bindir=$FG_PG_BIN
        else
            bindir=$(fg_pg__find_bindir "$ver")
        fi
        if [[ -z $bindir ]]; then
            fg_err "$data was created by PostgreSQL $ver, whose binaries are missing;" \
                "remove $data to start afresh"
            return 1
        fi
        FG_PG_BIN=$bindir
    fi

    if running_port=$(fg_pg__private_running_port); then
        if [[ $running_port != "$port" ]]; then
            fg_warn "private cluster is already running on port $running_port (not $port), reusing it"
        fi
        fg_log "reusing running private PostgreSQL cluster in $FG_PG_DIR (port $running_port)"
        FG_PG_PORT_USED=$running_port
        return 0
    fi

    if [[ ! -s $data/PG_VERSION ]]; then
        if [[ -d $data ]] && [[ -n $(ls -A "$data" 2>/dev/null) ]]; then
            fg_err "$data is not empty but holds no cluster (interrupted initdb?); remove it and retry"
            return 1
        fi
        mkdir -m 0700 "$data" 2>/dev/null || [[ -d $data ]] || return 1
        ((EUID == 0)) && { chown "$FG_PG_OWNER:" "$data" || return 1; }
        fg_log "initdb: new private PostgreSQL $(fg_pg__bin_major) cluster in $data"
        if ! fg_pg__as_owner "$FG_PG_BIN/initdb" -D "$data" -U postgres --auth=trust \
            --encoding=UTF8 --no-locale >"$FG_PG_DIR/initdb.log" 2>&1 {lockfd}>&-; then
            fg_err "initdb failed:"
            tail -n 20 "$FG_PG_DIR/initdb.log" >&2
            return 1
        fi
        printf "\n# fleetgate: settings of the private cluster (rewritten at each start)\ninclude_if_exists = 'fleetgate.conf'\n" \
            >>"$data/postgresql.conf" || return 1
    fi

    mkdir -p "$sock" || return 1
    : >>"$log" || return 1
    if ((EUID == 0)); then
        chown "$FG_PG_OWNER:" "$sock" "$log" || return 1
    fi
    conf=$data/fleetgate.conf
    {
        echo "# Written by scripts/pg.sh at each start; disposable test cluster."
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = $(fg_pg__conf_quote "$sock")"
        echo "max_connections = 200"
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
    } >"$conf" || return 1
    ((EUID == 0)) && chown "$FG_PG_OWNER:" "$conf"

    if fg_pg__tcp_open 127.0.0.1 "$port"; then
        fg_err "port $port on 127.0.0.1 is taken by another program; set FLEETGATE_PG_PORT to a free port"
        return 1
    fi
    fg_log "starting private PostgreSQL on 127.0.0.1:$port (log: $log)"
    if ! fg_pg__as_owner "$FG_PG_BIN/pg_ctl" -D "$data" -l "$log" -w -t 60 -s start \
        </dev/null >/dev/null 2>&1 {lockfd}>&-; then
        fg_err "PostgreSQL did not start; last lines of $log:"
        tail -n 20 "$log" >&2
        return 1
    fi
    FG_PG_OURS=1
    FG_PG_PORT_USED=$port
}

fg_pg__private() {
    local lockfd rc=0

    fg_pg__ensure_owner || return 1
    FG_PG_BIN=$(fg_pg__find_bindir)
    if [[ -n $FG_PG_BIN && ! -x $FG_PG_BIN/initdb ]]; then
        fg_err "no initdb in FLEETGATE_PG_BINDIR=$FG_PG_BIN"
        return 1
    fi
    if [[ -z $FG_PG_BIN ]]; then
        fg_pg__install || return 1
        FG_PG_BIN=$(fg_pg__find_bindir)
        if [[ -z $FG_PG_BIN ]]; then
            fg_err "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin even after apt-get install"
            return 1
        fi
        fg_pg__ensure_owner || return 1 # the package creates the postgres user
    fi
    fg_pg__pick_dir || return 1

    # Serialise concurrent fg_pg_ensure calls (two scripts starting at once).
    if command -v flock >/dev/null 2>&1 && exec {lockfd}>>"$FG_PG_DIR/lock"; then
        if ! flock -w 120 "$lockfd"; then
            fg_warn "could not lock $FG_PG_DIR/lock within 120s, going on anyway"
        fi
        fg_pg__private_start "$lockfd" || rc=1
        exec {lockfd}>&-
    else
        fg_pg__private_start 999 || rc=1
    fi
    ((rc == 0)) || return 1

    FG_PG_MODE=private
    export DATABASE_URL="postgres://postgres@127.0.0.1:$FG_PG_PORT_USED/${FLEETGATE_PG_DB:-fleetgate}"
}

# --- public API --------------------------------------------------------------------

# Make DATABASE_URL point at a working PostgreSQL server (see the top of the file).
fg_pg_ensure() {
    local db=${FLEETGATE_PG_DB:-fleetgate}
    if [[ ${FLEETGATE_PG_FORCE_PRIVATE:-0} == 1 ]]; then
        fg_log "FLEETGATE_PG_FORCE_PRIVATE=1: using the private PostgreSQL cluster"
    else
        if [[ -n ${DATABASE_URL:-} ]]; then
            if fg_pg__reachable "$DATABASE_URL"; then
                fg_log "PostgreSQL: using DATABASE_URL=$(fg_pg_redact "$DATABASE_URL")"
                FG_PG_MODE=${FG_PG_MODE:-url}
                export DATABASE_URL
                return 0
            fi
            fg_warn "DATABASE_URL=$(fg_pg_redact "$DATABASE_URL") does not answer, looking elsewhere"
        fi
        if fg_pg__trusted 5432; then
            export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
            FG_PG_MODE=system
            fg_log "PostgreSQL: using the server at 127.0.0.1:5432 (DATABASE_URL=$DATABASE_URL)"
            return 0
        fi
        fg_log "no PostgreSQL at 127.0.0.1:5432 with trust auth: using a private cluster"
    fi
    fg_pg__private || return 1
    fg_log "PostgreSQL: DATABASE_URL=$DATABASE_URL"
}

# Stop the private cluster if (and only if) this shell started it. Always returns 0.
fg_pg_stop_if_ours() {
    [[ ${FG_PG_OURS:-0} == 1 ]] || return 0
    FG_PG_OURS=0
    fg_log "stopping the private PostgreSQL cluster ($FG_PG_DIR)"
    if ! fg_pg__as_owner "$FG_PG_BIN/pg_ctl" -D "$FG_PG_DIR/data" -m fast -w -t 60 -s stop \
        </dev/null >/dev/null 2>&1; then
        fg_warn "could not stop PostgreSQL in $FG_PG_DIR/data (see $FG_PG_DIR/log)"
    fi
    return 0
}
