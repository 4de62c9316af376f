#!/bin/sh
# `make run-live`: keygate's live demo. Makes a key set with the CLI (once), serves it with
# `keygate serve`, runs Envoy with keygate polling that key set and posting usage reports back to
# it, and prints what to paste in another terminal: a call with a key, its revocation, the 401 a
# second later, calls with another key, and `keygate list --usage`. Ctrl-C stops both processes.
#
# Run it from the repository root:  sh envoy/live/demo.sh [ENVOY [KEYGATE]]
#   ENVOY    the Envoy binary [.venv/bin/envoy]
#   KEYGATE  the keygate binary [target/debug/keygate]
# Environment (each optional): DEMO_DIR [target/demo-live], DEMO_PORT [10000], DEMO_ADMIN_PORT
# [9901], DEMO_ECHO_PORT [10001], DEMO_SERVE_PORT [8089], KEYGATE_WASM (the filter)
# [target/wasm32-wasip1/release/keygate.wasm]. tests/demo.rs runs it with a temporary directory and
# free ports, and runs the commands it prints.
#
# The demo directory holds keys.json (the key set: hashes only), keys.env (the keys themselves,
# which `keygate new` prints only once: plain text, fine under target/ for a demo, never for real
# keys), public/ (what keygate serve serves), usage/ (the reports it keeps), serve.log and
# envoy.yaml (envoy/live/envoy.yaml with the ports and filter above). It is made once and kept:
# run the demo again and the same keys, and their usage so far, are still there.
set -u

envoy="${1:-.venv/bin/envoy}"
keygate="${2:-target/debug/keygate}"
dir="${DEMO_DIR:-target/demo-live}"
port="${DEMO_PORT:-10000}"
admin="${DEMO_ADMIN_PORT:-9901}"
echo_port="${DEMO_ECHO_PORT:-10001}"
serve_port="${DEMO_SERVE_PORT:-8089}"
wasm="${KEYGATE_WASM:-target/wasm32-wasip1/release/keygate.wasm}"
template=envoy/live/envoy.yaml

fail() {
  echo "keygate demo: $*" >&2
  exit 1
}

[ -f "$template" ] || fail "run it from the repository root ($template not found)"
command -v curl > /dev/null 2>&1 || fail "the demo's commands use curl: install it first"
[ -x "$keygate" ] || fail "no keygate at $keygate (cargo build -p keygate-cli)"
[ -x "$envoy" ] || fail "no Envoy at $envoy (make envoy)"
[ -f "$wasm" ] || fail "no filter at $wasm (make build)"

# The key set, made once with the CLI in a directory beside the final one, which is then renamed:
# an interrupted first run leaves no half-made demo behind.
if [ ! -f "$dir/keys.env" ]; then
  [ ! -e "$dir" ] || fail "$dir exists but holds no keys.env: remove it (rm -rf $dir) and run the demo again"
  new="$dir.new"
  rm -rf "$new"
  mkdir -p "$new" || fail "cannot create $new"
  (
    umask 077
    reader=$("$keygate" new --org org_42 --name "Demo: venue v_7 reader" --scope venues:read \
      --scope treatments:read --attr venue=v_7 --keys "$new/keys.json") &&
      partner=$("$keygate" new --org org_42 --name "Demo: venues only" --scope venues:read \
        --keys "$new/keys.json") &&
      spare=$("$keygate" new --org org_99 --name "Demo: never used" --scope venues:read \
        --keys "$new/keys.json") &&
      printf 'READER=%s\nPARTNER=%s\nSPARE=%s\n' "$reader" "$partner" "$spare" > "$new/keys.env"
  ) || fail "could not make the demo's keys"
  mv "$new" "$dir" || fail "cannot rename $new to $dir"
  echo "keygate demo: made the demo's keys in $dir (the keys themselves in $dir/keys.env)" >&2
fi
. "$dir/keys.env"
reader_id=$(echo "$READER" | cut -d_ -f3)

# What keygate serve serves: the key set in the live layout, published afresh at each start.
"$keygate" config --keys "$dir/keys.json" --shards "$dir/public" || fail "could not publish $dir/keys.json"

sed -e "s/port_value: 10000 }/port_value: $port }/" -e "s/port_value: 9901 }/port_value: $admin }/" \
  -e "s/port_value: 10001 }/port_value: $echo_port }/" -e "s/port_value: 8089 }/port_value: $serve_port }/" \
  -e "s#filename: target/wasm32-wasip1/release/keygate.wasm#filename: \"$wasm\"#" \
  "$template" > "$dir/envoy.yaml" || fail "cannot write $dir/envoy.yaml"

serve_pid=
envoy_pid=
cleanup() {
  trap - EXIT INT TERM
  for pid in $envoy_pid $serve_pid; do
    kill "$pid" 2> /dev/null
  done
  wait
  echo "keygate demo: Envoy and keygate serve stopped" >&2
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap cleanup EXIT

"$keygate" serve --keys "$dir/public" --usage-dir "$dir/usage" --listen "127.0.0.1:$serve_port" \
  2> "$dir/serve.log" &
serve_pid=$!
tries=0
until grep -q "listening on" "$dir/serve.log" 2> /dev/null; do
  if ! kill -0 "$serve_pid" 2> /dev/null || [ "$tries" -ge 50 ]; then
    cat "$dir/serve.log" >&2
    fail "keygate serve did not start on 127.0.0.1:$serve_port (is a demo already running?)"
  fi
  tries=$((tries + 1))
  sleep 0.1
done

"$envoy" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning &
envoy_pid=$!
tries=0
until curl -sf "http://127.0.0.1:$admin/ready" > /dev/null 2>&1; do
  kill -0 "$envoy_pid" 2> /dev/null || fail "Envoy did not start (its log is above)"
  [ "$tries" -lt 200 ] || fail "Envoy was not ready within 20 s"
  tries=$((tries + 1))
  sleep 0.1
done
# Ready once the first poll has loaded the key set (a request before that is answered 503).
tries=0
until [ "$(curl -s "http://127.0.0.1:$admin/stats?filter=keygate.key_set.keys" | sed -n 's/.*keygate\.key_set\.keys: //p')" \
  -gt 0 ] 2> /dev/null; do
  [ "$tries" -lt 100 ] || fail "keygate did not load the key set from keygate serve within 10 s ($dir/serve.log)"
  tries=$((tries + 1))
  sleep 0.1
done

if [ "$("$keygate" list --keys "$dir/keys.json" | awk -v id="$reader_id" '$1 == id { print $NF }')" = revoked ]; then
  revoked_note="
Key $reader_id was revoked in an earlier run, so step 1 answers 401 too. To start afresh: Ctrl-C,
rm -rf $dir, then make run-live again.
"
else
  revoked_note=
fi

cat << TXT

keygate live demo: Envoy on http://127.0.0.1:$port (admin on 127.0.0.1:$admin), and keygate serve on
http://127.0.0.1:$serve_port, from which keygate polls its key set every second and to which it
posts usage reports every 2 seconds. $dir holds the key set (keys.json: hashes only), the
keys themselves (keys.env: plain text, for this demo only), what keygate serve serves (public/),
the usage reports it keeps (usage/) and its log (serve.log).
$revoked_note
In another terminal, from the repository root:

  # 1. A call with the reader key: 200, and the upstream's echo shows who called (and no key)
  curl -s http://127.0.0.1:$port/v1/venues/v_7/treatments -H "Authorization: Bearer $READER"

  # 2. Revoke that key and republish the key set that keygate serve serves
  $keygate revoke $reader_id --keys $dir/keys.json --shards $dir/public

  # 3. At the next poll, a second at most, the same call is refused: 401
  curl -si http://127.0.0.1:$port/v1/venues/v_7/treatments -H "Authorization: Bearer $READER"

  # 4. Calls with the other key (venues:read, any venue): 200, 200, 200, then 403 (no treatments:read)
  for path in /v1/venues /v1/venues/v_7 /v1/venues/v_8 /v1/venues/v_7/treatments; do
    curl -s -o /dev/null -w "%{http_code} \$path\n" "http://127.0.0.1:$port\$path" -H "X-API-Key: $PARTNER"
  done

  # 5. After the next usage report, 2 seconds at most: last used and requests per key
  $keygate list --keys $dir/keys.json --usage $dir/usage

Ctrl-C stops Envoy and keygate serve.

TXT

wait "$envoy_pid"
status=$?
envoy_pid=
echo "keygate demo: Envoy exited (status $status)" >&2
exit "$status"
