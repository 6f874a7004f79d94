#!/usr/bin/env bash
# Serve the bundled Flask app (examples/flask_hello/app.py) with oxwsgi behind a real nginx, on
# http://127.0.0.1:${PORT:-8080}/, with two workers and Prometheus metrics on
# http://127.0.0.1:${METRICS_PORT:-9191}/metrics. Runs in the foreground; Ctrl-C (or SIGTERM) stops both.
# nginx runs as the current user with its pid file, logs and temp files under tmp/ in the repository.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

port=${PORT:-8080}
metrics_port=${METRICS_PORT:-9191}
for value in "$port" "$metrics_port"; do
    case $value in
        '' | *[!0-9]*) echo "example: error: PORT and METRICS_PORT must be numbers, got '$value'" >&2; exit 2 ;;
    esac
done

bash scripts/setup.sh

nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
prefix=$repo/tmp/nginx
socket=$repo/tmp/oxwsgi.sock
mkdir -p "$prefix"

# Render the shared template (also used by the end-to-end tests).
sed -e "s|{{PREFIX}}|$prefix|g" \
    -e "s|{{HTTP_PORT}}|$port|g" \
    -e "s|{{UPSTREAM}}|unix:$socket|g" \
    nginx/test.conf.template >"$prefix/nginx.conf"

# wait_listening PID unix|tcp ADDRESS: poll-connect until ADDRESS accepts (bounded); fail early if PID exits.
wait_listening() {
    python3 - "$@" <<'PY'
import os, socket, sys, time

pid, kind, address = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for _ in range(600):  # 600 tries, 50 ms apart
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"example: error: the server for {address} exited before listening (see above)")
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(f"example: error: nothing listens on {address}")
PY
}

oxwsgi_pid=''
nginx_pid=''
stop() {
    trap - INT TERM EXIT
    echo
    echo "==> stopping"
    # Both stop gracefully on SIGTERM; wait for each so the script ends after them.
    for pid in $nginx_pid $oxwsgi_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $nginx_pid $oxwsgi_pid; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Fail clearly if something (an earlier run, another server) already holds the port.
python3 - "$port" <<'PY'
import socket, sys

with socket.socket() as s:
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError as err:
        sys.exit(f"example: error: 127.0.0.1:{sys.argv[1]} is busy ({err.strerror}); set PORT to another")
PY

echo "==> starting oxwsgi on $socket"
target/release/oxwsgi --socket "$socket" --chmod-socket 666 \
    --wsgi-file examples/flask_hello/app.py --processes 2 --threads 4 \
    --metrics "127.0.0.1:$metrics_port" &
oxwsgi_pid=$!

wait_listening "$oxwsgi_pid" unix "$socket"
wait_listening "$oxwsgi_pid" tcp "127.0.0.1:$metrics_port"

echo "==> starting nginx on 127.0.0.1:$port (logs in $prefix)"
"$nginx_bin" -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log" &
nginx_pid=$!
wait_listening "$nginx_pid" tcp "127.0.0.1:$port"

echo
echo "Open http://127.0.0.1:$port/"
echo "Metrics: http://127.0.0.1:$metrics_port/metrics (see grafana/README.md for the dashboard)"
echo "(Ctrl-C stops oxwsgi and nginx)"

# Stay in the foreground until either process exits or we are interrupted.
wait -n "$oxwsgi_pid" "$nginx_pid" || true
echo "example: a server exited; see $prefix/error.log and the messages above" >&2
exit 1
