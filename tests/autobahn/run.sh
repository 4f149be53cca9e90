#!/usr/bin/env bash
# Autobahn|Testsuite against Herald's own WebSocket stack: the same listener, upgrade,
# tungstenite reader and Herald's frame writer, with websocket.echo = true (refused on
# anything but loopback). kosoku (PyPI) runs the Autobahn case files; compare.py diffs
# the outcome with the expected file, where every case that is not OK is explained.
# Two passes: cases 1-10 (expected.json), then 12-13, permessage-deflate, with
# websocket.deflate on (expected-deflate.json; a few minutes on a debug build).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/kosoku-venv
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kosoku==0.1.0
fi
bin=${HERALD_BIN:-target/debug/herald}
[ -x "$bin" ] || { echo "autobahn: $bin not built (cargo build -p herald)"; exit 1; }

# run <report dir> <expected file> <extra env...> -- <kosoku selection...>
run() {
  local out=$1 expected=$2
  shift 2
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done
  shift
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env HERALD_WEBSOCKET__ECHO=true \
    HERALD_LIMITS__MAX_MESSAGE_BYTES=20000000 \
    HERALD_LIMITS__OUTBOUND_QUEUE_BYTES=100000000 \
    HERALD_LIMITS__MESSAGES_PER_SECOND=1000000 \
    HERALD_LIMITS__MESSAGE_BURST=1000000 \
    HERALD_LOG__LEVEL=warn \
    "${env[@]}" "$bin" --listen "127.0.0.1:$port" &
  local pid=$!
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
  done
  rm -rf "$out"
  # kosoku exits 1 when a case fails; compare.py decides, against the expected file.
  timeout 900 "$venv/bin/kosoku" -o "$out" -p 4 "$@" \
    "ws://127.0.0.1:$port/ws" > "$out.log" 2>&1 || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  tail -n 2 "$out.log"
  python3 tests/autobahn/compare.py "$out" "$expected"
}

run target/autobahn tests/autobahn/expected.json -- -x '12.*' -x '13.*'
run target/autobahn-deflate tests/autobahn/expected-deflate.json \
  HERALD_WEBSOCKET__DEFLATE=true HERALD_WEBSOCKET__DEFLATE_MIN_BYTES=0 -- -i '12.*' -i '13.*'
