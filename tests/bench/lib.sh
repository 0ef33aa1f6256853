# Shell helpers shared by the benchmark scripts (sourced, not run).
# shellcheck shell=bash

alive() { # PID: running and not a zombie
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

stop_pids() { # PID...: SIGTERM, up to 30 s, then SIGKILL; reaps them
  local p any
  [ $# -gt 0 ] || return 0
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 300); do
    any=0
    for p in "$@"; do alive "$p" && any=1; done
    [ $any = 0 ] && break
    sleep 0.1
  done
  for p in "$@"; do
    if alive "$p"; then echo "$(basename "$0"): pid $p ignored SIGTERM for 30 s; killing it" >&2; kill -KILL "$p" 2>/dev/null || true; fi
    wait "$p" 2>/dev/null || true
  done
}
