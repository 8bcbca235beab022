#!/usr/bin/env bash
# Prometheus + Alertmanager for otel_ml without Docker: the shipped configuration, run with the
# native binaries (Debian: apt-get install prometheus prometheus-alertmanager) on loopback ports.
#
#   deploy/local/run.sh                       # Ctrl-C stops both
#   otel-ml targets otel-ml-runs/RUN > deploy/targets/RUN.json    # in another terminal
#
#   otel-ml backfill otel-ml-runs/RUN --out /tmp/otel-ml-tsdb     # a finished offline run
#   deploy/local/run.sh --backfilled /tmp/otel-ml-tsdb
#
# --backfilled DIR: Prometheus serves DIR (blocks made by `otel-ml backfill --out DIR`) as its
# TSDB, with a 100y retention so that an old run's blocks are not deleted at start, and the
# shipped rules (alerts are evaluated from now on; the README's "After the run" shows how to
# backfill the recording rules over the run). New samples it scrapes land in DIR too.
#
# Environment (all optional):
#   PROMETHEUS_PORT     9090
#   ALERTMANAGER_PORT   9093
#   TARGETS_DIR         deploy/targets        file_sd JSON files (*.json), watched by Prometheus
#   DATA_DIR            deploy/local/.data    generated config, TSDB, Alertmanager state, logs
#   COLLECTOR_TARGET    127.0.0.1:8889        the collector's prometheus exporter, if one runs
#   PROMETHEUS_BIN      prometheus
#   ALERTMANAGER_BIN    prometheus-alertmanager (or alertmanager)
#   READY_TIMEOUT       60                    seconds to wait for /-/ready
#
# Prometheus runs deploy/prometheus/prometheus.yml with four substitutions, written to
# $DATA_DIR/prometheus.yml: the file_sd directory (/etc/prometheus/targets -> TARGETS_DIR), the
# rules directory (rules/ -> deploy/prometheus/rules/, absolute), the Alertmanager address
# (alertmanager:9093 -> 127.0.0.1:ALERTMANAGER_PORT) and the collector address
# (otel-collector:8889 -> COLLECTOR_TARGET). Alertmanager runs
# deploy/alertmanager/alertmanager.yml unchanged. Both listen on 127.0.0.1 only.
# tests/integration/test_deploy_local.py runs this script for real.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # bash 5.2: '&' in a replacement is literal

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(dirname "$here")"

BACKFILLED=""
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${ALERTMANAGER_PORT:-9093}"
TARGETS_DIR="${TARGETS_DIR:-$deploy/targets}"
DATA_DIR="${DATA_DIR:-$here/.data}"
COLLECTOR_TARGET="${COLLECTOR_TARGET:-127.0.0.1:8889}"
READY_TIMEOUT="${READY_TIMEOUT:-60}"

die() {
    echo "run.sh: $*" >&2
    exit 1
}

find_binary() { # $1: explicit choice (may be empty), then candidates
    local choice="$1" candidate
    shift
    if [[ -n "$choice" ]]; then
        command -v "$choice" >/dev/null || die "$choice not found"
        command -v "$choice"
        return
    fi
    for candidate in "$@"; do
        if command -v "$candidate" >/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "none of $* found (Debian: apt-get install prometheus prometheus-alertmanager)"
}

while (($#)); do
    case "$1" in
    --backfilled)
        (($# >= 2)) || die "--backfilled needs a directory (made by: otel-ml backfill RUN_DIR --out DIR)"
        BACKFILLED="$2"
        shift 2
        ;;
    --backfilled=*)
        BACKFILLED="${1#*=}"
        shift
        ;;
    *) die "unknown argument: $1 (usage: run.sh [--backfilled DIR])" ;;
    esac
done
prom_storage=""
prom_extra=()
if [[ -n "$BACKFILLED" ]]; then
    [[ -d "$BACKFILLED" ]] ||
        die "--backfilled $BACKFILLED: not a directory (make it with: otel-ml backfill RUN_DIR --out $BACKFILLED)"
    prom_storage="$(cd "$BACKFILLED" && pwd)"
    prom_extra=(--storage.tsdb.retention.time=100y)
fi

PROMETHEUS_BIN="$(find_binary "${PROMETHEUS_BIN:-}" prometheus)"
ALERTMANAGER_BIN="$(find_binary "${ALERTMANAGER_BIN:-}" prometheus-alertmanager alertmanager)"
for port in "$PROMETHEUS_PORT" "$ALERTMANAGER_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || die "not a port number: $port"
done
[[ "$PROMETHEUS_PORT" != "$ALERTMANAGER_PORT" ]] || die "PROMETHEUS_PORT and ALERTMANAGER_PORT are equal"

port_taken() { # something accepts connections on 127.0.0.1:$1
    (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null
}
for port in "$PROMETHEUS_PORT" "$ALERTMANAGER_PORT"; do
    if port_taken "$port"; then
        die "port $port on 127.0.0.1 is already in use (another Prometheus/Alertmanager, e.g. the" \
            "Debian services?): stop it or set PROMETHEUS_PORT / ALERTMANAGER_PORT"
    fi
done

mkdir -p "$TARGETS_DIR" "$DATA_DIR/prometheus" "$DATA_DIR/alertmanager"
TARGETS_DIR="$(cd "$TARGETS_DIR" && pwd)"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
prom_storage="${prom_storage:-$DATA_DIR/prometheus}"

# --- the shipped Prometheus config, adjusted for loopback and local paths ----------------------
shipped="$deploy/prometheus/prometheus.yml"
config=""
while IFS= read -r line || [[ -n "$line" ]]; do # drop full-line comments, keep the rest
    [[ "$line" =~ ^[[:space:]]*# ]] || config+="$line"$'\n'
done <"$shipped"
config="${config//\/etc\/prometheus\/targets\//"$TARGETS_DIR/"}"
config="${config//- rules\//"- $deploy/prometheus/rules/"}"
config="${config//alertmanager:9093/"127.0.0.1:$ALERTMANAGER_PORT"}"
config="${config//otel-collector:8889/"$COLLECTOR_TARGET"}"
for stale in /etc/prometheus "- rules/" alertmanager:9093 otel-collector:8889; do
    if [[ "$config" == *"$stale"* ]]; then
        die "$shipped still mentions '$stale' after substitution: update deploy/local/run.sh"
    fi
done
printf '# Generated by deploy/local/run.sh from %s; edits are overwritten.\n%s' \
    "$shipped" "$config" >"$DATA_DIR/prometheus.yml"
if promtool="$(command -v promtool)"; then
    "$promtool" check config "$DATA_DIR/prometheus.yml" >"$DATA_DIR/promtool.log" 2>&1 ||
        die "promtool check config failed: $(cat "$DATA_DIR/promtool.log")"
fi

# --- start both, stop both ----------------------------------------------------------------------
prom_pid=""
am_pid=""

alive() { # running, not a zombie (an exited child stays a zombie until `wait` reaps it)
    local stat state
    kill -0 "$1" 2>/dev/null || return 1
    [[ -r "/proc/$1/stat" ]] || return 0
    stat="$(<"/proc/$1/stat")" || return 1
    state="${stat##*) }"
    [[ "${state%% *}" != Z ]]
}

stop() {
    local pid waited=0
    trap - EXIT INT TERM
    for pid in $prom_pid $am_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $prom_pid $am_pid; do
        while alive "$pid" && ((waited < 100)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -f "$DATA_DIR/prometheus.pid" "$DATA_DIR/alertmanager.pid"
    echo "run.sh: stopped Prometheus and Alertmanager" >&2
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Background jobs of a non-interactive shell ignore SIGINT; stop() sends them SIGTERM.
"$ALERTMANAGER_BIN" \
    --config.file="$deploy/alertmanager/alertmanager.yml" \
    --storage.path="$DATA_DIR/alertmanager" \
    --web.listen-address="127.0.0.1:$ALERTMANAGER_PORT" \
    --cluster.listen-address= \
    >"$DATA_DIR/alertmanager.log" 2>&1 &
am_pid=$!
echo "$am_pid" >"$DATA_DIR/alertmanager.pid"

"$PROMETHEUS_BIN" \
    --config.file="$DATA_DIR/prometheus.yml" \
    --storage.tsdb.path="$prom_storage" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle \
    "${prom_extra[@]}" \
    >"$DATA_DIR/prometheus.log" 2>&1 &
prom_pid=$!
echo "$prom_pid" >"$DATA_DIR/prometheus.pid"

wait_ready() { # $1 name, $2 pid, $3 port, $4 log
    local deadline=$((SECONDS + READY_TIMEOUT))
    until alive "$2" && curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$3/-/ready" 2>/dev/null; do
        if ! alive "$2"; then
            echo "run.sh: $1 exited; last lines of $4:" >&2
            tail -n 20 "$4" >&2
            exit 1
        fi
        ((SECONDS < deadline)) || die "$1 not ready after ${READY_TIMEOUT}s (log: $4)"
        sleep 0.2
    done
}
command -v curl >/dev/null || die "curl not found"
wait_ready Alertmanager "$am_pid" "$ALERTMANAGER_PORT" "$DATA_DIR/alertmanager.log"
wait_ready Prometheus "$prom_pid" "$PROMETHEUS_PORT" "$DATA_DIR/prometheus.log"

cat <<EOF
Prometheus    http://127.0.0.1:$PROMETHEUS_PORT   (pid $prom_pid, log $DATA_DIR/prometheus.log)
Alertmanager  http://127.0.0.1:$ALERTMANAGER_PORT   (pid $am_pid, log $DATA_DIR/alertmanager.log)
Targets       $TARGETS_DIR/*.json   e.g. otel-ml targets otel-ml-runs/RUN > $TARGETS_DIR/RUN.json
Rules         $deploy/prometheus/rules/*.yaml
TSDB          $prom_storage
Ctrl-C stops both.
EOF

# Returns when either server exits (then stop() ends the other) or on a signal.
set +e
wait -n
status=$?
echo "run.sh: a server exited (status $status); see the logs in $DATA_DIR" >&2
exit "$status"
