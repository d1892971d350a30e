#!/bin/sh
# Entrypoint of the panal images: prepare first-start state, then `exec panal "$@"`.
#   hub serve --dir D   first runs `panal hub init --dir D --host $PANAL_HUB_HOST`, which is
#                       idempotent (creates only what is missing, never replaces keys or the
#                       certificate) and prints the join URL into the container log.
#   agent run           with PANAL_JOIN_URL set, joins that hub once; the URL joined is remembered
#                       in $PANAL_HOME/.joined-url so restarts do not re-register.
# Anything else is passed straight to `panal` (e.g. `docker run IMAGE agent status`).
set -eu

if [ "${1:-}" = "hub" ] && [ "${2:-}" = "serve" ]; then
    dir=hubdata
    prev=""
    for arg in "$@"; do
        if [ "$prev" = "--dir" ]; then dir=$arg; fi
        case $arg in --dir=*) dir=${arg#--dir=} ;; esac
        prev=$arg
    done
    panal hub init --dir "$dir" --host "${PANAL_HUB_HOST:-localhost}"
fi

if [ "${1:-}" = "agent" ] && [ "${2:-}" = "run" ] && [ -n "${PANAL_JOIN_URL:-}" ]; then
    marker="${PANAL_HOME:?PANAL_HOME must be set}/.joined-url"
    if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$PANAL_JOIN_URL" ]; then
        panal agent join "$PANAL_JOIN_URL"
        printf '%s\n' "$PANAL_JOIN_URL" > "$marker"
    fi
fi

exec panal "$@"
