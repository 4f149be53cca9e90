#!/usr/bin/env bash
# Autobahn|Testsuite cases 1-10 against Herald's own WebSocket stack: the same
# listener, upgrade, tungstenite configuration and session reader/writer, with
# websocket.echo = true (refused on anything but loopback). kosoku (PyPI) runs the
# Autobahn case files; compare.py diffs the outcome with expected.json, where every
# case that is not OK is explained. 12.* and 13.* need permessage-deflate, which
# tungstenite does not implement.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/kosoku-venv
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kosoku==0.1.0
fi
bin=${HERALD_BIN:-target/debug/herald}
[ -x "$bin" ] || { echo "autobahn: $bin not built (cargo build -p herald)"; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HERALD_WEBSOCKET__ECHO=true \
HERALD_LIMITS__MAX_MESSAGE_BYTES=20000000 \
HERALD_LIMITS__OUTBOUND_QUEUE_BYTES=100000000 \
HERALD_LIMITS__MESSAGES_PER_SECOND=1000000 \
HERALD_LIMITS__MESSAGE_BURST=1000000 \
HERALD_LOG__LEVEL=warn \
  "$bin" --listen "127.0.0.1:$port" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
  sleep 0.1
done

rm -rf target/autobahn
# kosoku exits 1 when a case fails; compare.py decides, against the expected file.
timeout 600 "$venv/bin/kosoku" -o target/autobahn -x '12.*' -x '13.*' -p 4 \
  "ws://127.0.0.1:$port/ws" > target/autobahn.log 2>&1 || true
tail -n 2 target/autobahn.log
python3 tests/autobahn/compare.py target/autobahn tests/autobahn/expected.json
