# shellcheck shell=bash
# A PostgreSQL for the test suites, on any machine. Meant to be sourced:
#
#   source scripts/pg.sh
#   trap stop_postgres EXIT
#   ensure_postgres || exit 1
#   cargo test ...        # IDEMPOTENCY_TEST_PG_URL is exported and answers
#
# ensure_postgres uses the server at $IDEMPOTENCY_TEST_PG_URL (default
# postgres://postgres@127.0.0.1:5432/test) when it answers. Otherwise it starts a private
# throwaway cluster: initdb in a fresh directory under /tmp, trust authentication, no TCP listener
# (only a Unix socket in that directory), fsync off, a database `test`; it installs Debian's
# postgresql package first (apt-get; needs root) when initdb/pg_ctl are missing. It then exports
# IDEMPOTENCY_TEST_PG_URL as postgres://postgres@%2Ftmp%2Fidempotency-pg-XXXXXX:5432/test (a
# percent-encoded socket directory as the host, which libpq and tokio-postgres both read as a
# Unix socket). stop_postgres stops that cluster and removes its directory; it does nothing when
# the machine's server was used, and it may be called more than once.
#
# As root, initdb and pg_ctl run as the `postgres` OS user (initdb refuses to run as root; the user
# is created when missing); otherwise as the current user. ensure_postgres prints one line saying
# which server the tests use, and returns non-zero with a message when there is none.

_pg_default_url="postgres://postgres@127.0.0.1:5432/test"
_pg_dir=""   # the private cluster's directory, while it exists
_pg_bin=""   # the directory of its initdb, pg_ctl, postgres, psql
_pg_as=()    # the command prefix that runs a program as the cluster's OS user
_pg_why=""   # why the last _pg_answers failed

_pg_say() { printf '%s\n' "$*" >&2; }

_pg_fail() {
    printf 'scripts/pg.sh: %s\n' "$*" >&2
    return 1
}

# The URL as printed: without its password.
_pg_redact() {
    sed -E -e 's#^([a-z]+://[^:@/]*:)[^@]*@#\1***@#' -e 's#(password=)[^[:space:]]*#\1***#g' <<<"$1"
}

# _pg_urlencode STRING: STRING percent-encoded (everything but letters, digits and -._~).
_pg_urlencode() {
    local LC_ALL=C s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [A-Za-z0-9._~-]) out+="$c" ;;
            *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s\n' "$out"
}

# The newest /usr/lib/postgresql/<version>/bin that has the server programs (Debian's layout),
# else the directory of an initdb found on PATH; nothing when there is neither.
_pg_find_bin() {
    local d best=""
    while IFS= read -r d; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" && -x "$d/psql" ]]; then
            best="$d"
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
    if [[ -z "$best" ]] && command -v initdb >/dev/null 2>&1; then
        d="$(dirname "$(readlink -f "$(command -v initdb)")")"
        if [[ -x "$d/pg_ctl" && -x "$d/postgres" && -x "$d/psql" ]]; then best="$d"; fi
    fi
    if [[ -n "$best" ]]; then printf '%s\n' "$best"; fi
}

# _pg_tool NAME: the path of a PostgreSQL client program (PATH first, then Debian's layout).
_pg_tool() {
    local bin
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
        return 0
    fi
    bin="$(_pg_find_bin)"
    if [[ -n "$bin" && -x "$bin/$1" ]]; then printf '%s\n' "$bin/$1"; fi
}

# _pg_answers URL: whether a server answers at URL. With psql: a real connection and `select 1`
# (the address, the authentication and the database all checked). Without psql: pg_isready. Without
# either: a TCP connect (or the socket file for a Unix socket). Sets _pg_why when it does not answer.
_pg_answers() {
    local url="$1" tool out host port rest
    _pg_why=""
    tool="$(_pg_tool psql)"
    if [[ -n "$tool" ]]; then
        if out="$(PGCONNECT_TIMEOUT=5 "$tool" -w -X -A -t -q -d "$url" -c 'select 1' </dev/null 2>&1)" &&
            [[ "$out" == 1 ]]; then
            return 0
        fi
        _pg_why="$(head -n 1 <<<"$out")"
        return 1
    fi
    tool="$(_pg_tool pg_isready)"
    if [[ -n "$tool" ]]; then
        if out="$("$tool" -d "$url" -t 5 </dev/null 2>&1)"; then return 0; fi
        _pg_why="pg_isready: $(head -n 1 <<<"$out")"
        return 1
    fi
    # Neither client program: the host and port from the URL (or key=value string), then a probe.
    host=""
    port=""
    if [[ "$url" == postgres://* || "$url" == postgresql://* ]]; then
        rest="${url#*://}"
        rest="${rest%%[/?]*}"
        rest="${rest##*@}"
        rest="${rest%%,*}"
        if [[ "$rest" == \[* ]]; then
            host="${rest%%]*}"
            host="${host#[}"
            rest="${rest#*]}"
            port="${rest#:}"
        else
            host="${rest%%:*}"
            if [[ "$rest" == *:* ]]; then port="${rest#*:}"; fi
        fi
        printf -v host '%b' "${host//%/\\x}"
    else
        if [[ " $url " =~ [[:space:]]host=([^[:space:]]+) ]]; then host="${BASH_REMATCH[1]}"; fi
        if [[ " $url " =~ [[:space:]]port=([^[:space:]]+) ]]; then port="${BASH_REMATCH[1]}"; fi
    fi
    host="${host:-localhost}"
    port="${port:-5432}"
    if [[ "$host" == /* ]]; then
        if [[ -S "$host/.s.PGSQL.$port" ]]; then return 0; fi
        _pg_why="no socket $host/.s.PGSQL.$port"
        return 1
    fi
    # shellcheck disable=SC2016 # expanded by the inner bash
    if timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null; then return 0; fi
    _pg_why="nothing answers on $host:$port (TCP)"
    return 1
}

# Installs Debian's postgresql package, the way scripts/bench-compare.sh installs redis-server.
_pg_install() {
    local sudo=()
    if ! command -v apt-get >/dev/null 2>&1; then
        _pg_fail "no PostgreSQL server programs (initdb, pg_ctl) and no apt-get to install them:" \
            "install PostgreSQL, or set IDEMPOTENCY_TEST_PG_URL to a server that answers"
        return 1
    fi
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            _pg_fail "no PostgreSQL server programs (initdb, pg_ctl), and installing Debian's" \
                "postgresql package needs root: run as root, or install it" \
                "(apt-get install postgresql), or set IDEMPOTENCY_TEST_PG_URL to a server that answers"
            return 1
        fi
    fi
    _pg_say "installing Debian's postgresql package (apt-get) ..."
    if ! "${sudo[@]}" apt-get update >&2 ||
        ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends postgresql >&2; then
        _pg_fail "apt-get could not install postgresql"
        return 1
    fi
}

# Runs a server program as the cluster's OS user, from the cluster's directory (initdb and the
# server complain when they cannot enter the caller's working directory).
_pg_run() {
    (cd "$_pg_dir" && "${_pg_as[@]}" env LC_ALL=C "$@")
}

# _pg_start_private BINDIR: initdb, start, CREATE DATABASE test; exports the URL.
_pg_start_private() {
    local bin="$1" port=5432 url out version
    _pg_bin="$bin"
    if [[ "$(id -u)" == 0 ]]; then
        if ! id -u postgres >/dev/null 2>&1; then
            useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
                --shell /bin/bash postgres ||
                { _pg_fail "could not create the postgres OS user (initdb refuses to run as root)"; return 1; }
        fi
        if command -v runuser >/dev/null 2>&1; then
            _pg_as=(runuser -u postgres --)
        else
            _pg_as=(setpriv --reuid=postgres --regid=postgres --init-groups --)
        fi
    else
        _pg_as=()
    fi

    # Under /tmp, not $TMPDIR: the postgres OS user must reach it, and a socket path has at most
    # 107 bytes.
    _pg_dir="$(mktemp -d /tmp/idempotency-pg-XXXXXX)" ||
        { _pg_dir=""; _pg_fail "mktemp -d failed"; return 1; }
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$_pg_dir" || { _pg_fail "chown postgres $_pg_dir failed"; return 1; }
    fi

    if ! _pg_run "$bin/initdb" -D "$_pg_dir/data" -U postgres --auth=trust -E UTF8 --locale=C \
        --no-sync >"$_pg_dir/initdb.log" 2>&1; then
        cat "$_pg_dir/initdb.log" >&2
        _pg_fail "initdb failed (its output is above)"
        return 1
    fi
    if ! _pg_run "$bin/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/log" -w -t 60 -o \
        "-c listen_addresses='' -c unix_socket_directories='$_pg_dir' -c port=$port -c fsync=off -c max_connections=200" \
        start >/dev/null 2>&1; then
        cat "$_pg_dir/log" >&2 2>/dev/null || true
        _pg_fail "the private PostgreSQL did not start (its log is above)"
        return 1
    fi
    if ! out="$("$bin/psql" -w -X -q -h "$_pg_dir" -p "$port" -U postgres -d postgres \
        -c 'CREATE DATABASE test' </dev/null 2>&1)"; then
        _pg_say "$out"
        _pg_fail "could not create the database test in the private PostgreSQL"
        return 1
    fi

    url="postgres://postgres@$(_pg_urlencode "$_pg_dir"):$port/test"
    if ! out="$("$bin/psql" -w -X -A -t -q -d "$url" -c 'select 1' </dev/null 2>&1)" || [[ "$out" != 1 ]]; then
        _pg_say "$out"
        _pg_fail "the private PostgreSQL does not answer at $url"
        return 1
    fi
    export IDEMPOTENCY_TEST_PG_URL="$url"
    version="$("$bin/postgres" --version 2>/dev/null | sed 's/^postgres (PostgreSQL) //')"
    _pg_say "PostgreSQL for the tests: $url (private throwaway cluster in $_pg_dir, PostgreSQL ${version:-?}; removed on exit)"
}

ensure_postgres() {
    local url="${IDEMPOTENCY_TEST_PG_URL:-$_pg_default_url}" bin
    if _pg_answers "$url"; then
        export IDEMPOTENCY_TEST_PG_URL="$url"
        _pg_say "PostgreSQL for the tests: $(_pg_redact "$url") (the machine's server)"
        return 0
    fi
    _pg_say "no PostgreSQL answers at $(_pg_redact "$url") (${_pg_why:-no answer}); starting a private throwaway cluster"

    bin="$(_pg_find_bin)"
    if [[ -z "$bin" ]]; then
        _pg_install || return 1
        # Debian's package may have created and started a cluster `main` on port 5432.
        if _pg_answers "$url"; then
            export IDEMPOTENCY_TEST_PG_URL="$url"
            _pg_say "PostgreSQL for the tests: $(_pg_redact "$url") (the machine's server, just installed)"
            return 0
        fi
        bin="$(_pg_find_bin)"
        if [[ -z "$bin" ]]; then
            _pg_fail "postgresql is installed but no initdb/pg_ctl was found under /usr/lib/postgresql/*/bin"
            return 1
        fi
    fi

    if ! _pg_start_private "$bin"; then
        stop_postgres
        return 1
    fi
}

# Stops the private cluster (if one was started) and removes its directory. For `trap ... EXIT`.
stop_postgres() {
    local dir="$_pg_dir" pid
    if [[ -z "$dir" ]]; then return 0; fi
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        if ! _pg_run "$_pg_bin/pg_ctl" -D "$dir/data" stop -m immediate -w -t 30 >/dev/null 2>&1; then
            # The postmaster this script started, by the pid it wrote.
            pid="$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)"
            if [[ "$pid" =~ ^[0-9]+$ ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
            _pg_say "scripts/pg.sh: pg_ctl stop failed; killed the private postmaster${pid:+ ($pid)}"
        fi
    fi
    _pg_dir=""
    case "$dir" in
        /tmp/idempotency-pg-*) rm -rf -- "$dir" ;;
    esac
    return 0
}
