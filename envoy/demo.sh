#!/bin/sh
# Prints what to try, then runs the demo Envoy in the foreground (Ctrl-C stops it).
envoy="${1:-.venv/bin/envoy}"
config="${2:-envoy/envoy.yaml}"
if [ "$config" != envoy/envoy.yaml ]; then
  echo "keygate: Envoy on http://127.0.0.1:10000 with $config (its demo keys are in its comments). Ctrl-C stops it."
  exec "$envoy" -c "$config" --concurrency 1 --disable-hot-restart -l warning
fi
K1=sk_live_ab12cd34_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0
K2=sk_live_5e6f7a8b_0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9
K3=sk_live_c0ffee00_deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef
cat <<TXT

keygate demo: Envoy on http://127.0.0.1:10000 (admin on 127.0.0.1:9901). In another terminal:

  # accepted: the upstream echoes what it received, identity headers included, no key
  curl -s http://127.0.0.1:10000/v1/venues/v_7/treatments -H "Authorization: Bearer $K1"

  # refused, 401: a revoked key
  curl -si http://127.0.0.1:10000/v1/venues -H "Authorization: Bearer $K3"

  # refused, 403: this key has venues:read but not treatments:read
  curl -si http://127.0.0.1:10000/v1/venues/v_7/treatments -H "X-API-Key: $K2"

  # refused, 403: a key restricted to venue v_7 reaching into venue v_8
  curl -si http://127.0.0.1:10000/v1/venues/v_8/treatments -H "Authorization: Bearer $K1"

  # spoofed identity headers never reach the upstream
  curl -s http://127.0.0.1:10000/v1/venues -H "X-API-Key: $K2" -H "X-Org-Id: someone_else"

  # keygate's counters
  curl -s http://127.0.0.1:9901/stats | grep keygate

Configuration: envoy/envoy.yaml. Ctrl-C stops Envoy.

TXT
exec "$envoy" -c envoy/envoy.yaml --concurrency 1 --disable-hot-restart -l warning
