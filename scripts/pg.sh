#!/usr/bin/env bash
# Finds or starts the PostgreSQL server that `make up-dev`, `make test` and
# `make bench` use. The one place that knows how.
#
#   scripts/pg.sh env [STORAGE]       ensure a server; print `export PG_HOST=… PG_PORT=…
#                                     PG_USER=… PG_PASSWORD=… PG_MODE=system|private
#                                     PG_STORAGE=timescaledb|postgresql PG_STORAGE_WHY=…`
#   scripts/pg.sh createdb NAME [STORAGE]  ensure a server and a database NAME on it
#   scripts/pg.sh stop                stop the private clusters (never the system server)
#   scripts/pg.sh status              say which servers would be used and whether they run
#
# STORAGE (else $PG_STORAGE, else auto) says which kind of server:
#   timescaledb  a private cluster preloading TimescaleDB (shared_preload_libraries):
#                data in .dev/pg-timescaledb, on 127.0.0.1:${PG_TIMESCALEDB_PORT:-54331}.
#                When the extension files are missing, the kit in
#                ../shared/timescaledb (or $TIMESCALEDB_KIT) is installed (install.sh,
#                idempotent, as root); without either it fails and says so.
#   postgresql   a server that does NOT preload TimescaleDB (the extension may be
#                installed, just not loadable): 127.0.0.1:5432 when pg_isready says it
#                accepts connections, user `postgres` can log in (password from
#                PG_PASSWORD) and it does not preload TimescaleDB (PG_FORCE_PRIVATE=1
#                skips it); else a private plain cluster in .dev/pg on
#                127.0.0.1:${PG_PRIVATE_PORT:-54329}.
#   auto         timescaledb when TimescaleDB is installed or its kit is at hand,
#                else postgresql (what `make up-dev` uses).
# Private clusters are made with the system's initdb/pg_ctl (newest under
# /usr/lib/postgresql/*/bin, else on PATH), superuser `postgres`, trust auth, unix
# socket in <dir>/run. As root they run as the `postgres` user via runuser. Missing
# binaries are installed with apt-get when running as root on Debian.
# Progress goes to stderr; only `env` writes to stdout.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SYSTEM_HOST=127.0.0.1
SYSTEM_PORT=5432
SUPERUSER=postgres
# Set per kind of private cluster by use_flavor.
PRIVATE_PORT=
DIR_RECORD=
DEFAULT_DIR=
PRELOAD=0

# Selects the private cluster of one kind: its port, folder, and whether it preloads.
use_flavor() {
    case $1 in
    timescaledb)
        PRIVATE_PORT=${PG_TIMESCALEDB_PORT:-54331} PRELOAD=1
        DEFAULT_DIR="$DEV_DIR/pg-timescaledb"
        ;;
    postgresql)
        PRIVATE_PORT=${PG_PRIVATE_PORT:-54329} PRELOAD=0
        DEFAULT_DIR="$DEV_DIR/pg"
        ;;
    *) die "unknown storage '$1' (timescaledb, postgresql or auto)" ;;
    esac
    # Where the cluster lives; remembered in a file so `stop` finds it again.
    DIR_RECORD="$DEFAULT_DIR.dir"
}

# The TimescaleDB kit's install.sh, or nothing.
timescaledb_kit() {
    local dir
    for dir in ${TIMESCALEDB_KIT:+"$TIMESCALEDB_KIT"} "$ROOT/../shared/timescaledb" "$ROOT/../../shared/timescaledb"; do
        if [[ -x $dir/install.sh || -f $dir/install.sh ]]; then
            echo "$dir/install.sh"
            return
        fi
    done
}

# True when the server binaries in $1 have the TimescaleDB extension files.
timescaledb_installed() {
    local share
    share=$("$1/pg_config" --sharedir 2>/dev/null || echo "/usr/share/postgresql/$(basename "$(dirname "$1")")")
    [[ -f $share/extension/timescaledb.control ]]
}

# Installs the kit when the extension files are missing; fails saying why.
ensure_timescaledb() {
    local bin_dir=$1 kit
    timescaledb_installed "$bin_dir" && return 0
    kit=$(timescaledb_kit)
    [[ -n $kit ]] || die "TimescaleDB is not installed for $bin_dir and no kit was found (../shared/timescaledb or TIMESCALEDB_KIT); install it (https://docs.timescale.com/self-hosted/latest/install/) or use storage postgresql"
    log "installing TimescaleDB from $kit"
    bash "$kit" >&2 || die "$kit could not install TimescaleDB"
    timescaledb_installed "$bin_dir" || die "$kit ran but the extension files are still missing for $bin_dir"
}

# Resolves `auto` to timescaledb or postgresql; sets STORAGE_WHY.
resolve_storage() {
    local storage=${1:-${PG_STORAGE:-auto}} bin_dir
    case $storage in
    timescaledb) STORAGE_WHY="TimescaleDB asked for" ;;
    postgresql) STORAGE_WHY="plain PostgreSQL asked for" ;;
    auto)
        bin_dir=$(server_bin_dir)
        if [[ -n $bin_dir ]] && timescaledb_installed "$bin_dir"; then
            storage=timescaledb STORAGE_WHY="TimescaleDB is installed"
        elif [[ -n $(timescaledb_kit) ]]; then
            storage=timescaledb STORAGE_WHY="the TimescaleDB kit is at hand"
        else
            storage=postgresql STORAGE_WHY="TimescaleDB is not installed"
        fi
        ;;
    *) die "unknown storage '$storage' (timescaledb, postgresql or auto)" ;;
    esac
    STORAGE=$storage
}

is_root() { [[ $(id -u) == 0 ]]; }

# Runs a server binary as the user that owns the private cluster.
as_owner() {
    if is_root; then
        # From /, which postgres can always enter (all paths here are absolute).
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

apt_install_postgresql() {
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "PostgreSQL binaries missing; installing them with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q postgresql >&2
    else
        die "PostgreSQL not found: neither a server on $SYSTEM_HOST:$SYSTEM_PORT nor initdb/pg_ctl/psql/pg_isready.
Install PostgreSQL (Debian/Ubuntu: sudo apt-get install -y postgresql; macOS: brew install postgresql) or start a server on $SYSTEM_HOST:$SYSTEM_PORT."
    fi
}

# Prints the directory holding initdb and pg_ctl, or nothing.
server_bin_dir() {
    local dir
    while IFS= read -r dir; do
        if [[ -x $dir/initdb && -x $dir/pg_ctl ]]; then
            echo "$dir"
            return
        fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -t/ -k5,5 -n -r)
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    fi
}

# Sets PSQL and PG_ISREADY, installing PostgreSQL if even the client is missing.
find_client() {
    local bin_dir attempt
    for attempt in 1 2; do
        bin_dir=$(server_bin_dir)
        PSQL=$(command -v psql || true)
        PG_ISREADY=$(command -v pg_isready || true)
        [[ -n $PSQL || ! -x $bin_dir/psql ]] || PSQL=$bin_dir/psql
        [[ -n $PG_ISREADY || ! -x $bin_dir/pg_isready ]] || PG_ISREADY=$bin_dir/pg_isready
        [[ -z $PSQL || -z $PG_ISREADY ]] || return 0
        ((attempt == 1)) && apt_install_postgresql
    done
    die "psql/pg_isready still not found after installing postgresql"
}

# True when `psql` can log in as the superuser at host:port.
can_login() {
    PGPASSWORD=${PG_PASSWORD:-} PGCONNECT_TIMEOUT=5 \
        "$PSQL" -h "$1" -p "$2" -U "$SUPERUSER" -d postgres -XAtqc 'select 1' >/dev/null 2>&1
}

# The system server serves plain PostgreSQL only: TimescaleDB runs in a private
# cluster we start preloaded, so both kinds are at hand side by side.
system_server_usable() {
    [[ ${PG_FORCE_PRIVATE:-0} != 1 ]] || return 1
    "$PG_ISREADY" -q -h "$SYSTEM_HOST" -p "$SYSTEM_PORT" || return 1
    if ! can_login "$SYSTEM_HOST" "$SYSTEM_PORT"; then
        warn "a server answers on $SYSTEM_HOST:$SYSTEM_PORT but user $SUPERUSER cannot log in (set PG_PASSWORD?); using a private cluster"
        return 1
    fi
    if [[ $(PGPASSWORD=${PG_PASSWORD:-} "$PSQL" -h "$SYSTEM_HOST" -p "$SYSTEM_PORT" -U "$SUPERUSER" -d postgres \
        -XAtqc 'show shared_preload_libraries' 2>/dev/null) == *timescaledb* ]]; then
        log "the server on $SYSTEM_HOST:$SYSTEM_PORT preloads TimescaleDB; using a private plain cluster"
        return 1
    fi
}

# Sets PG_DIR: the recorded one, else .dev/pg if the owner can write there, else a
# folder under /tmp (as root, .dev may sit below a home directory postgres cannot enter).
resolve_private_dir() {
    mkdir -p "$DEV_DIR"
    if [[ -f $DIR_RECORD ]]; then
        PG_DIR=$(<"$DIR_RECORD")
    else
        PG_DIR="$DEFAULT_DIR"
    fi
    mkdir -p "$PG_DIR"
    if is_root; then
        id -u postgres >/dev/null 2>&1 ||
            die "running as root needs the 'postgres' user to own the private cluster (apt-get install -y postgresql creates it)"
        chown postgres: "$PG_DIR"
        if ! runuser -u postgres -- test -w "$PG_DIR"; then
            rmdir "$PG_DIR" 2>/dev/null || true
            PG_DIR="/tmp/os-credits-$(basename "$DEFAULT_DIR")-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
            warn "user postgres cannot reach $DEV_DIR; keeping the private cluster in $PG_DIR"
            mkdir -p "$PG_DIR"
            chown postgres: "$PG_DIR"
        fi
        chmod 700 "$PG_DIR"
    fi
    echo "$PG_DIR" >"$DIR_RECORD"
}

private_running() {
    local bin_dir=$1
    [[ -f $PG_DIR/data/postmaster.pid ]] &&
        as_owner "$bin_dir/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1
}

start_private() {
    local bin_dir socket_dir socket_opt
    bin_dir=$(server_bin_dir)
    if [[ -z $bin_dir ]]; then
        apt_install_postgresql
        bin_dir=$(server_bin_dir)
        [[ -n $bin_dir ]] || die "initdb/pg_ctl still not found after installing postgresql"
    fi
    ((PRELOAD == 0)) || ensure_timescaledb "$bin_dir"
    resolve_private_dir

    if [[ ! -f $PG_DIR/data/PG_VERSION ]]; then
        log "creating a private PostgreSQL cluster in $PG_DIR/data ($bin_dir)"
        as_owner "$bin_dir/initdb" -D "$PG_DIR/data" -U "$SUPERUSER" --auth=trust \
            --encoding=UTF8 --no-locale --no-sync >"$PG_DIR/initdb.log" 2>&1 ||
            die "initdb failed; see $PG_DIR/initdb.log"
    fi

    if private_running "$bin_dir"; then
        "$PG_ISREADY" -q -h 127.0.0.1 -p "$PRIVATE_PORT" ||
            die "the private cluster in $PG_DIR runs but not on port $PRIVATE_PORT; run scripts/pg.sh stop first"
        return
    fi
    port_free "$PRIVATE_PORT" ||
        die "port $PRIVATE_PORT is taken by another program; choose another with PG_PRIVATE_PORT (plain) or PG_TIMESCALEDB_PORT"

    socket_dir="$PG_DIR/run"
    mkdir -p "$socket_dir"
    is_root && chown postgres: "$socket_dir"
    # Unix socket paths are limited to ~107 bytes; without room, use TCP only.
    if ((${#socket_dir} + 20 < 100)); then
        socket_opt="-c unix_socket_directories='$socket_dir'"
    else
        socket_opt="-c unix_socket_directories=''"
    fi
    local preload_opt=""
    if ((PRELOAD)); then
        preload_opt="-c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off"
    fi
    log "starting the private PostgreSQL cluster on 127.0.0.1:$PRIVATE_PORT${preload_opt:+ (TimescaleDB preloaded)}"
    as_owner "$bin_dir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PRIVATE_PORT $socket_opt $preload_opt" start >&2 ||
        die "the private cluster did not start; see $PG_DIR/postgres.log"
}

# Sets PG_HOST, PG_PORT, PG_USER, PG_PASSWORD, PG_MODE, PG_STORAGE and
# PG_STORAGE_WHY for storage $1, starting a server if needed.
ensure() {
    find_client
    resolve_storage "${1:-}"
    use_flavor "$STORAGE"
    PG_STORAGE=$STORAGE PG_STORAGE_WHY=$STORAGE_WHY
    if [[ $STORAGE == postgresql ]] && system_server_usable; then
        PG_HOST=$SYSTEM_HOST PG_PORT=$SYSTEM_PORT PG_MODE=system
        PG_PASSWORD=${PG_PASSWORD:-}
    else
        start_private
        PG_HOST=127.0.0.1 PG_PORT=$PRIVATE_PORT PG_MODE=private PG_PASSWORD=
        can_login "$PG_HOST" "$PG_PORT" || die "cannot log in to the private cluster on $PG_HOST:$PG_PORT"
    fi
    PG_USER=$SUPERUSER
}

cmd_env() {
    ensure "${1:-}"
    local name
    for name in PG_HOST PG_PORT PG_USER PG_PASSWORD PG_MODE PG_STORAGE PG_STORAGE_WHY; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done
}

cmd_createdb() {
    local db=${1:?usage: scripts/pg.sh createdb NAME [STORAGE]}
    ensure "${2:-}"
    local sql=(env PGPASSWORD="$PG_PASSWORD" "$PSQL" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER"
        -d postgres -XAtq -v ON_ERROR_STOP=1 -v "db=$db")
    # psql interpolates :'db' / :"db" only in scripts read from stdin, not in -c.
    if [[ -z $("${sql[@]}" <<<"SELECT 1 FROM pg_database WHERE datname = :'db';") ]]; then
        log "creating database $db on $PG_HOST:$PG_PORT"
        "${sql[@]}" <<<'CREATE DATABASE :"db";' >&2
    fi
}

cmd_stop() {
    local bin_dir flavor
    bin_dir=$(server_bin_dir)
    [[ -n $bin_dir ]] || return 0
    for flavor in postgresql timescaledb; do
        use_flavor "$flavor"
        [[ -f $DIR_RECORD ]] || continue
        PG_DIR=$(<"$DIR_RECORD")
        if private_running "$bin_dir"; then
            log "stopping the private PostgreSQL cluster in $PG_DIR"
            as_owner "$bin_dir/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >&2
        fi
    done
}

cmd_status() {
    local flavor
    find_client
    resolve_storage ""
    echo "auto: $STORAGE ($STORAGE_WHY)"
    for flavor in postgresql timescaledb; do
        use_flavor "$flavor"
        if [[ $flavor == postgresql ]] && system_server_usable; then
            echo "$flavor: system server on $SYSTEM_HOST:$SYSTEM_PORT"
        elif [[ -f $DIR_RECORD ]] && PG_DIR=$(<"$DIR_RECORD") && [[ -n $(server_bin_dir) ]] &&
            private_running "$(server_bin_dir)"; then
            echo "$flavor: private cluster in $PG_DIR on 127.0.0.1:$PRIVATE_PORT (running)"
        else
            echo "$flavor: private cluster on 127.0.0.1:$PRIVATE_PORT (not running; 'env $flavor' starts it)"
        fi
    done
}

case ${1:-} in
env) cmd_env "${2:-}" ;;
createdb) cmd_createdb "${2:-}" "${3:-}" ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
    ;;
esac
