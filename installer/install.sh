#!/usr/bin/env bash
# Installs epm-service, the ipcbus endpoint manager, as a systemd service.
#
#   sudo installer/install.sh [--port 4455] [--bind ADDR]... [--password-file FILE]
#                             [--salt SALT] [--no-password] [--prefix /usr/local]
#                             [--binary PATH] [--user ipcbus] [--root DIR] [--dry-run]
#
# What it does (each step is skipped when already done, so running it twice is safe):
#   1. builds epm-service (cargo build --profile deploy: release without debug
#      info, stripped) unless --binary names one;
#   2. installs it as PREFIX/bin/epm-service, stripped of symbols and debug info;
#   3. creates the system user (default ipcbus) that runs it;
#   4. writes /etc/ipcbus/epm.toml (port, bind, salt, password_file) and the
#      password file /etc/ipcbus/epm.password, mode 0600, owned by that user;
#   5. writes the hardened unit /etc/systemd/system/ipcbus-epm.service;
#   6. when systemd is running: daemon-reload, enable, and (re)start the service.
# Settings not given on a re-run are kept from the existing /etc/ipcbus/epm.toml; a
# password and salt are generated on the first run when none are given.
#
# --root DIR installs everything below DIR (packaging, tests): no user is created,
# nothing is chowned unless the user exists, and systemd is not touched.
# --dry-run prints what would be done and changes nothing.
set -euo pipefail

SERVICE=ipcbus-epm.service
PORT=""
BINDS=()
BIND_GIVEN=0
PASSWORD_FILE=""
SALT=""
NO_PASSWORD=0
PREFIX=/usr/local
BINARY=""
SERVICE_USER=ipcbus
ROOT=""
DRY=0

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The comment block at the top of this file, up to the first line that is not a
# comment.
usage() {
    awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
}

die() {
    echo "install.sh: error: $*" >&2
    exit 2
}

need_value() {
    [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --port) need_value "$@"; PORT=$2; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        --bind) need_value "$@"; BINDS+=("$2"); BIND_GIVEN=1; shift 2 ;;
        --bind=*) BINDS+=("${1#*=}"); BIND_GIVEN=1; shift ;;
        --password-file) need_value "$@"; PASSWORD_FILE=$2; shift 2 ;;
        --password-file=*) PASSWORD_FILE=${1#*=}; shift ;;
        --salt) need_value "$@"; SALT=$2; shift 2 ;;
        --salt=*) SALT=${1#*=}; shift ;;
        --no-password) NO_PASSWORD=1; shift ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --binary) need_value "$@"; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#*=}; shift ;;
        --user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
        --user=*) SERVICE_USER=${1#*=}; shift ;;
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

# ---- validate ---------------------------------------------------------------------

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) ROOT="$(pwd)/$ROOT" ;; esac
    ROOT=${ROOT%/}
fi
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || die "--user $SERVICE_USER is not a valid user name"
if [ -n "$PORT" ]; then
    [[ "$PORT" =~ ^[0-9]{1,5}$ ]] && [ "$PORT" -le 65535 ] || die "--port $PORT is not a port (0-65535)"
fi
BIND_RE='^[][0-9A-Za-z:.%]+$'
for b in "${BINDS[@]+"${BINDS[@]}"}"; do
    [[ "$b" =~ $BIND_RE ]] || die "--bind $b is not an address (IP or IP:PORT, IPv6 as [::1]:4455)"
done
valid_salt() {
    [[ "$1" =~ ^(0[xX])?([0-9A-Fa-f]{2})+$ ]] ||
        [[ "$1" =~ ^\{[[:space:]]*(0[xX][0-9A-Fa-f]{1,2}|[0-9]{1,3})([[:space:]]*,[[:space:]]*(0[xX][0-9A-Fa-f]{1,2}|[0-9]{1,3}))*[[:space:]]*\}$ ]]
}
if [ -n "$SALT" ]; then
    valid_salt "$SALT" || die "--salt $SALT is neither hex (0a1b2c) nor the {0x01,0x02,0x03} form"
fi
if [ "$NO_PASSWORD" = 1 ] && { [ -n "$PASSWORD_FILE" ] || [ -n "$SALT" ]; }; then
    die "--no-password cannot be combined with --password-file or --salt"
fi
if [ -n "$PASSWORD_FILE" ]; then
    [ -r "$PASSWORD_FILE" ] || die "cannot read password file $PASSWORD_FILE"
    [ -n "$(head -n 1 "$PASSWORD_FILE" | tr -d '\r')" ] || die "password file $PASSWORD_FILE is empty"
fi
if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --root DIR to stage the files, or --dry-run"
fi

BINDIR=$PREFIX/bin
CONFDIR=/etc/ipcbus
CONFIG=$CONFDIR/epm.toml
PWFILE=$CONFDIR/epm.password
UNITDIR=/etc/systemd/system

# ---- helpers ----------------------------------------------------------------------

say() { echo "install.sh: $*"; }

# Runs a command, or prints it with --dry-run.
run() {
    if [ "$DRY" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

user_exists() { getent passwd "$SERVICE_USER" >/dev/null 2>&1; }

# May files be given to the service user? Only as root, and only if it exists.
can_chown() { [ "$(id -u)" = 0 ] && user_exists; }

# put FILE_WITH_CONTENT DEST MODE OWNER:GROUP  — atomically, only when it changed.
put() {
    local src=$1 dest=$2 mode=$3 owner=$4
    local path=$ROOT$dest
    if [ "$DRY" = 1 ]; then
        echo "would write $path (mode $mode${owner:+, owner $owner})"
        if [ "$dest" = "$CONFIG" ]; then sed 's/^/    | /' "$src"; fi
        return
    fi
    mkdir -p "$(dirname "$path")"
    if [ -f "$path" ] && cmp -s "$src" "$path"; then
        say "unchanged $path"
    else
        local tmp
        tmp=$(mktemp "$(dirname "$path")/.install.XXXXXX")
        cat "$src" >"$tmp"
        chmod "$mode" "$tmp"
        mv -f "$tmp" "$path"
        say "wrote $path"
    fi
    chmod "$mode" "$path"
    if [ -n "$owner" ] && can_chown; then
        chown "$owner" "$path"
    fi
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Reads KEY = VALUE from the existing config (our own format), without quotes.
existing() {
    local f=$ROOT$CONFIG
    [ -f "$f" ] || return 0
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$f" | head -n 1 | sed 's/^"\(.*\)"$/\1/'
}

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

toml_string() {
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

# ---- 1. the binary ----------------------------------------------------------------

if [ -z "$BINARY" ]; then
    REPO=$(cd "$HERE/.." && pwd)
    TARGET=${CARGO_TARGET_DIR:-$REPO/target}
    # The `deploy` profile (Cargo.toml): release without debug info, stripped.
    say "building epm-service (cargo build --profile deploy)"
    if [ "$DRY" = 1 ]; then
        echo "would run: cargo build --profile deploy --locked -p ipcbus-epm --bin epm-service (in $REPO)"
    else
        command -v cargo >/dev/null || die "cargo not found: install Rust, or pass --binary PATH"
        (cd "$REPO" && cargo build --profile deploy --locked -p ipcbus-epm --bin epm-service)
    fi
    BINARY=$TARGET/deploy/epm-service
fi
if [ "$DRY" = 0 ]; then
    [ -f "$BINARY" ] && [ -x "$BINARY" ] || die "$BINARY is not an executable file"
fi

# The copy to install: without symbols and debug info (a --binary may have them).
STRIPPED=$WORK/epm-service
if [ "$DRY" = 0 ]; then
    cp "$BINARY" "$STRIPPED"
    if command -v strip >/dev/null; then
        strip "$STRIPPED" 2>/dev/null || say "cannot strip $BINARY (another architecture, or not ELF?): installing it as it is"
    else
        say "strip (binutils) not found: installing $BINARY with its symbols"
    fi
fi

# ---- 2. install it ----------------------------------------------------------------

if [ "$DRY" = 1 ]; then
    echo "would install $BINARY, stripped, as $ROOT$BINDIR/epm-service (mode 0755)"
else
    mkdir -p "$ROOT$BINDIR"
    if [ -f "$ROOT$BINDIR/epm-service" ] && cmp -s "$STRIPPED" "$ROOT$BINDIR/epm-service"; then
        say "unchanged $ROOT$BINDIR/epm-service"
    else
        install -m 0755 "$STRIPPED" "$ROOT$BINDIR/.epm-service.new"
        mv -f "$ROOT$BINDIR/.epm-service.new" "$ROOT$BINDIR/epm-service"
        say "installed $ROOT$BINDIR/epm-service"
    fi
fi

# ---- 3. the system user -----------------------------------------------------------

if [ -n "$ROOT" ]; then
    say "--root: not creating the system user $SERVICE_USER (create it on the target host)"
elif user_exists; then
    say "system user $SERVICE_USER exists"
else
    NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
    if command -v useradd >/dev/null; then
        run useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell "$NOLOGIN" --comment "ipcbus endpoint manager" "$SERVICE_USER"
    elif command -v adduser >/dev/null; then
        run adduser --system --group --no-create-home --home /nonexistent \
            --shell "$NOLOGIN" "$SERVICE_USER"
    else
        die "neither useradd nor adduser is available to create $SERVICE_USER"
    fi
fi

# ---- 4. configuration and password ------------------------------------------------

[ -n "$PORT" ] || PORT=$(existing port)
[ -n "$PORT" ] || PORT=4455
if [ "$BIND_GIVEN" = 0 ]; then
    OLD_BIND=$(existing bind)
fi

if [ "$DRY" = 1 ]; then
    echo "would create $ROOT$CONFDIR (mode 0750${SERVICE_USER:+, group $SERVICE_USER})"
else
    mkdir -p "$ROOT$CONFDIR"
    chmod 0750 "$ROOT$CONFDIR"
    if can_chown; then chown "root:$SERVICE_USER" "$ROOT$CONFDIR"; fi
fi

HAVE_PASSWORD=0
GENERATED=0
SALT_GENERATED=0
if [ "$NO_PASSWORD" = 1 ]; then
    if [ -e "$ROOT$PWFILE" ]; then run rm -f "$ROOT$PWFILE"; fi
    SALT=""
else
    HAVE_PASSWORD=1
    if [ -n "$PASSWORD_FILE" ]; then
        head -n 1 "$PASSWORD_FILE" | tr -d '\r' >"$WORK/password"
        put "$WORK/password" "$PWFILE" 0600 "$SERVICE_USER:$SERVICE_USER"
    elif [ -s "$ROOT$PWFILE" ]; then
        say "keeping the existing password in $ROOT$PWFILE"
        if [ "$DRY" = 0 ]; then
            chmod 0600 "$ROOT$PWFILE"
            if can_chown; then chown "$SERVICE_USER:$SERVICE_USER" "$ROOT$PWFILE"; fi
        fi
    else
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '\n' >"$WORK/password" && echo >>"$WORK/password")
        put "$WORK/password" "$PWFILE" 0600 "$SERVICE_USER:$SERVICE_USER"
        GENERATED=1
    fi
    [ -n "$SALT" ] || SALT=$(existing salt)
    if [ -z "$SALT" ]; then
        SALT=$(random_hex 16)
        SALT_GENERATED=1
    fi
fi

{
    echo "# ipcbus endpoint manager: written by installer/install.sh; edit and restart"
    echo "# the service (systemctl restart $SERVICE), or re-run install.sh."
    echo "port = $PORT"
    if [ "$BIND_GIVEN" = 1 ]; then
        printf 'bind = ['
        sep=""
        for b in "${BINDS[@]}"; do printf '%s%s' "$sep" "$(toml_string "$b")"; sep=", "; done
        printf ']\n'
    elif [ -n "${OLD_BIND:-}" ]; then
        echo "bind = $OLD_BIND"
    fi
    if [ "$HAVE_PASSWORD" = 1 ]; then
        echo "password_file = $(toml_string "$PWFILE")"
        echo "salt = $(toml_string "$SALT")"
    fi
    echo "lease_ms = $(existing lease_ms | grep -E '^[0-9]+$' || echo 10000)"
} >"$WORK/epm.toml"
put "$WORK/epm.toml" "$CONFIG" 0640 "root:$SERVICE_USER"

# ---- 5. the unit ------------------------------------------------------------------

CAPS=""
if [ "$PORT" != 0 ] && [ "$PORT" -lt 1024 ]; then CAPS=CAP_NET_BIND_SERVICE; fi
# Lines starting with `#%` describe the template itself and are left out.
sed -e '/^#%/d' \
    -e "s|@BINDIR@|$BINDIR|g" -e "s|@CONFDIR@|$CONFDIR|g" \
    -e "s|@USER@|$SERVICE_USER|g" -e "s|@CAPS@|$CAPS|g" \
    "$HERE/ipcbus-epm.service" >"$WORK/unit"
put "$WORK/unit" "$UNITDIR/$SERVICE" 0644 ""

# ---- 6. systemd -------------------------------------------------------------------

if [ -n "$ROOT" ]; then
    say "--root: not touching systemd"
elif [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable "$SERVICE"
    run systemctl restart "$SERVICE"
    say "service $SERVICE enabled and (re)started; logs: journalctl -u $SERVICE"
else
    say "systemd is not running here: start it yourself with"
    say "  sudo -u $SERVICE_USER $BINDIR/epm-service --config $CONFIG"
fi

# ---- done: how to reach it --------------------------------------------------------

if [ "$DRY" = 1 ]; then
    say "dry run: nothing was changed"
fi
if [ "$PORT" = 0 ]; then
    say "port 0: the service picks a free port at each start (tests only); its log says which"
fi
LAN=192.168.1.0/24
say "EPM port $PORT/tcp. Firewall hint: open it to your LAN only; with your LAN's"
say "subnet in place of $LAN, any one of:"
say "  ufw allow from $LAN to any port $PORT proto tcp"
say "  firewall-cmd --permanent --add-rich-rule='rule family=\"ipv4\" source address=\"$LAN\" port port=\"$PORT\" protocol=\"tcp\" accept' && firewall-cmd --reload"
say "  nft add rule inet filter input ip saddr $LAN tcp dport $PORT accept"
if [ "$HAVE_PASSWORD" = 1 ]; then
    if [ "$GENERATED" = 1 ] && [ "$DRY" = 1 ]; then
        say "would generate a random password in $ROOT$PWFILE; give clients a copy"
    elif [ "$GENERATED" = 1 ]; then
        say "generated a random password in $ROOT$PWFILE; give clients a copy"
    fi
    if [ "$SALT_GENERATED" = 1 ] && [ "$DRY" = 1 ]; then
        say "would generate a random salt (a dry run shows one that is not kept)"
    fi
    say "clients: ipcbus --epm HOST:$PORT --password-file FILE --salt $SALT list"
else
    say "no password: anyone who can reach port $PORT can register and look up receivers"
    say "clients: ipcbus --epm HOST:$PORT list"
fi
