#!/usr/bin/env bash
# Removes what install.sh installed: stops and disables ipcbus-epm.service, removes
# the unit, the epm-service binary, /etc/ipcbus and the system user.
#
#   sudo installer/uninstall.sh [--keep-config] [--prefix /usr/local] [--user ipcbus]
#                               [--root DIR] [--dry-run]
#
# --keep-config keeps /etc/ipcbus (configuration and password) and the system user
# that owns them, so a later install.sh picks the same settings up again.
# --root DIR removes the files below DIR and does not touch systemd or users.
# --dry-run prints what would be done and changes nothing.
set -euo pipefail

SERVICE=ipcbus-epm.service
PREFIX=/usr/local
SERVICE_USER=ipcbus
ROOT=""
DRY=0
KEEP=0

die() {
    echo "uninstall.sh: error: $*" >&2
    exit 2
}

need_value() {
    [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --keep-config) KEEP=1; shift ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
        --user=*) SERVICE_USER=${1#*=}; shift ;;
        --root) need_value "$@"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --dry-run) DRY=1; shift ;;
        # The comment block at the top of this file.
        -h|--help) awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
if [ -n "$ROOT" ]; then
    case "$ROOT" in /*) ;; *) ROOT="$(pwd)/$ROOT" ;; esac
    ROOT=${ROOT%/}
    [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
fi
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || die "--user $SERVICE_USER is not a valid user name"
if [ -z "$ROOT" ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --root DIR, or --dry-run"
fi

say() { echo "uninstall.sh: $*"; }

run() {
    if [ "$DRY" = 1 ]; then
        echo "would run: $*"
    else
        "$@"
    fi
}

remove() {
    local path=$ROOT$1
    if [ -e "$path" ] || [ -L "$path" ]; then
        run rm -rf -- "$path"
        [ "$DRY" = 1 ] || say "removed $path"
    fi
}

UNIT=/etc/systemd/system/$SERVICE

if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    if systemctl list-unit-files "$SERVICE" >/dev/null 2>&1; then
        run systemctl disable --now "$SERVICE" || true
    fi
fi

remove "$UNIT"
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl reset-failed "$SERVICE" 2>/dev/null || true
fi
remove "$PREFIX/bin/epm-service"

if [ "$KEEP" = 1 ]; then
    say "keeping $ROOT/etc/ipcbus and the user $SERVICE_USER (--keep-config)"
else
    remove /etc/ipcbus
    if [ -z "$ROOT" ] && getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        run userdel "$SERVICE_USER"
        if getent group "$SERVICE_USER" >/dev/null 2>&1; then
            run groupdel "$SERVICE_USER" 2>/dev/null || true
        fi
    fi
fi
if [ "$DRY" = 1 ]; then
    say "dry run: nothing was changed"
else
    say "done"
fi
