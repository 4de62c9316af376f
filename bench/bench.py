#!/usr/bin/env python3
"""keygate's benchmark (`make bench`): Envoy CPU per request, latency, memory and start-up.

One Envoy at a time, `--concurrency 1` for the CPU part, on loopback; its only route is a
`direct_response` 200, so what is measured is Envoy plus the filter under test and nothing behind
it. A closed-loop load generator (wrk) drives it. Variants:

  none           no filter
  api_key_auth   Envoy's own envoy.filters.http.api_key_auth with the same keys (plaintext, as it needs)
  noop           a no-op proxy-wasm filter (bench/noop: reads `authorization`, continues)
  floor          the floor for wasm (bench/floor): only keygate's mandated work on the same keys (read
                 `authorization`, SHA-256 of the token, map lookup, remove the key, set three identity
                 headers, 401 when unknown)
  wasm-inline    keygate's wasm filter, keys in its plugin configuration
  wasm-live      keygate's wasm filter, keys from a key-set endpoint into proxy-wasm shared data
  native-inline  keygate's native dynamic module (libkeygate.so), keys in its filter configuration
  native-live    keygate's native dynamic module, keys from the same key-set endpoint (one copy per
                 process)

Traffic: an accepted request on a route with scopes and a tenant binding, and a flood of invalid
keys of valid format (a different key on every request, cycled from a pool). Variants are
interleaved over rounds and medians reported; ratios are computed per round (same conditions)
and their median taken. Figures on a shared machine are noisy: trust the ratios, not absolute
times.

Environment: ROUNDS (5), DURATION (s per run, 5), CONNECTIONS (16), CPU_KEYS (keys in the CPU
part, 1000000), SCALE (1k,100k,1m), SCALE_CONCURRENCY (2,4), SCALE_TIMEOUT (s, 900),
PARTS (cpu,scale,size), ENVOY, KEYGATE_WASM, NOOP_WASM, FLOOR_WASM, KEYGATE_NATIVE (libkeygate.so; Envoy
finds it through ENVOY_DYNAMIC_MODULES_SEARCH_PATH, set to its directory), KEYGATE (the `keygate`
command, which lays out the live variants' key set: target/release/keygate), OUT (report path),
ENVOY_LOG_LEVEL (warning).
A variant that fails to start is reported with Envoy's error, and its log kept in target/bench/logs/.
Python 3.11 standard library only.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVOY = os.environ.get("ENVOY", str(ROOT / ".venv/bin/envoy"))
KEYGATE_WASM = Path(os.environ.get("KEYGATE_WASM", ROOT / "target/wasm32-wasip1/release/keygate.wasm"))
NOOP_WASM = Path(os.environ.get("NOOP_WASM", ROOT / "target/bench/noop/wasm32-wasip1/release/keygate_bench_noop.wasm"))
FLOOR_WASM = Path(os.environ.get("FLOOR_WASM",
                                 ROOT / "target/bench/floor/wasm32-wasip1/release/keygate_bench_floor.wasm"))
KEYGATE_NATIVE = Path(os.environ.get("KEYGATE_NATIVE", ROOT / "target/release/libkeygate.so"))
KEYGATE = Path(os.environ.get("KEYGATE", ROOT / "target/release/keygate"))
OUT = Path(os.environ.get("OUT", ROOT / "target/bench/report.md"))

ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = int(os.environ.get("DURATION", "5"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
WARMUP_S = 1
SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}
CPU_KEYS = int(os.environ.get("CPU_KEYS", "1000000"))
SCALE = [s.strip().lower() for s in os.environ.get("SCALE", "1k,100k,1m").split(",") if s.strip()]
SCALE_CONCURRENCY = [int(c) for c in os.environ.get("SCALE_CONCURRENCY", "2,4").split(",") if c.strip()]
SCALE_TIMEOUT = float(os.environ.get("SCALE_TIMEOUT", "900"))
PARTS = {p.strip() for p in os.environ.get("PARTS", "cpu,scale,size").split(",") if p.strip()}
SIZE_TARGET_KIB = 448

PATH = "/v1/venues/v_7/treatments"        # the bench key is bound to venue v_7
BENCH_INDEX = 7                           # key i: org_{i % 1000}, venue v_{i % 1000}
TICK = os.sysconf("SC_CLK_TCK")

CPU_VARIANTS = ["none", "api_key_auth", "noop", "floor", "wasm-inline", "wasm-live", "wasm-live-usage",
                "native-inline", "native-live", "native-live-usage"]
# VARIANTS=a,b,... runs only those of the CPU part (the ratios of the others are then "—").
if os.environ.get("VARIANTS"):
    CPU_VARIANTS = [v for v in CPU_VARIANTS if v in os.environ["VARIANTS"].split(",")]
SCALE_VARIANTS = ["api_key_auth", "wasm-inline", "wasm-live", "native-inline", "native-live"]
LABELS = {
    "none": "no filter",
    "api_key_auth": "Envoy `api_key_auth`",
    "noop": "no-op wasm filter",
    "floor": "floor wasm filter",
    "wasm-inline": "keygate wasm, inline keys",
    "wasm-live": "keygate wasm, live key set",
    "native-inline": "keygate native, inline keys",
    "native-live": "keygate native, live key set",
    "wasm-live-usage": "keygate wasm, live key set, usage reporting",
    "native-live-usage": "keygate native, live key set, usage reporting",
}
KEYGATE_VARIANTS = ("wasm-inline", "wasm-live", "wasm-live-usage", "native-inline", "native-live",
                    "native-live-usage")
# keygate's wasm variant that each native one is held against (same keys, same key source).
WASM_TWIN = {"native-inline": "wasm-inline", "native-live": "wasm-live", "native-live-usage": "wasm-live-usage"}
# Each usage variant against the same variant without usage reporting.
WITHOUT_USAGE = {"wasm-live-usage": "wasm-live", "native-live-usage": "native-live"}
# The variants that refuse an unknown key (the rest check nothing and answer 200).
REFUSING = ("api_key_auth", "floor") + KEYGATE_VARIANTS
CASES = {"accepted": "accepted request", "invalid": "invalid-key flood"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- keys ---------------------------------------------------------------------------------------

@dataclass
class Keys:
    """n deterministic keys `sk_live_{8 hex id}_{64 hex secret}` and their SHA-256 hashes."""

    n: int
    ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, n: int) -> "Keys":
        k = cls(n)
        sha = hashlib.sha256
        for i in range(n):
            kid = f"{i:08x}"
            secret = sha(b"keygate-bench-secret-%d" % i).hexdigest()
            key = f"sk_live_{kid}_{secret}"
            k.ids.append(kid)
            k.keys.append(key)
            k.hashes.append(sha(key.encode()).hexdigest())
        return k

    def record(self, i: int) -> str:
        """keygate's key record for key i, as JSON text (built by hand: a million of them)."""
        return (f'{{"id":"{self.ids[i]}","hash":"{self.hashes[i]}","org":"org_{i % 1000}",'
                f'"scopes":["treatments:read"],"attributes":{{"venue":"v_{i % 1000}"}}}}')

    def records(self) -> str:
        """Every key record as a JSON list: keygate's `keys`, and the floor filter's configuration."""
        return "[" + ",".join(self.record(i) for i in range(self.n)) + "]"

    @property
    def bench_key(self) -> str:
        return self.keys[BENCH_INDEX]


_KEYS: dict[int, Keys] = {}


def keys_for(n: int) -> Keys:
    if n not in _KEYS:
        t = time.monotonic()
        # The largest set holds every smaller one as its prefix.
        big = max(_KEYS.values(), key=lambda k: k.n, default=None)
        if big is not None and big.n >= n:
            _KEYS[n] = Keys(n, big.ids[:n], big.keys[:n], big.hashes[:n])
        else:
            _KEYS[n] = Keys.make(n)
        log(f"{n} keys generated in {time.monotonic() - t:.1f} s")
    return _KEYS[n]


# ---- Envoy configurations -----------------------------------------------------------------------

ROUTES = [{"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
           "bind": {"venue_id": "venue"}}]
KEYGATE_BASE = {
    "credential": {"headers": ["authorization"], "prefixes": ["sk_live_"]},
    "routes": ROUTES,
    "unmatched": "deny",
    "upstream": {"attribute_headers": {"venue": "x-venue-id"}},
}
SENTINEL = "\"__KEYS__\""


def wasm_filter(name: str, wasm: Path, configuration: str) -> str:
    """The wasm HTTP filter as JSON text, its configuration (a string) encoded once."""
    return json.dumps({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name, "root_id": name, "failure_policy": "FAIL_RELOAD",
                "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": str(wasm)}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": configuration},
            },
        },
    })


def keygate_configuration(keys: Keys | None, key_set: dict | None, usage: dict | None = None) -> str:
    cfg = dict(KEYGATE_BASE)
    if key_set is not None:
        cfg["key_set"] = key_set
    if usage is not None:
        cfg["usage"] = usage
    if keys is None:
        return json.dumps(cfg)
    cfg["keys"] = "__KEYS__"
    head, tail = json.dumps(cfg).split(SENTINEL)
    return head + keys.records() + tail


def keygate_native_filter(configuration: str) -> str:
    """keygate's native dynamic module as an HTTP filter (JSON text), loaded by name from
    ENVOY_DYNAMIC_MODULES_SEARCH_PATH (see `Envoy`)."""
    return json.dumps({
        "name": "keygate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": {"name": native_module_name()},
            "filter_name": "keygate",
            "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
        },
    })


def native_module_name() -> str:
    """The name Envoy loads `lib<name>.so` by: KEYGATE_NATIVE's file name without `lib` and `.so`."""
    return KEYGATE_NATIVE.name.removeprefix("lib").removesuffix(".so")


def api_key_auth_filter(keys: Keys) -> str:
    head = ('{"name":"envoy.filters.http.api_key_auth","typed_config":{"@type":'
            '"type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",'
            '"key_sources":[{"header":"authorization"}],'
            '"forwarding":{"header":"x-api-key-id","hide_credentials":true},"credentials":[')
    # api_key_auth compares the plaintext key (after stripping "Bearer ") and names its client.
    body = ",".join(f'{{"key":"{keys.keys[i]}","client":"{keys.ids[i]}"}}' for i in range(keys.n))
    return head + body + "]}}"


def envoy_config(filters: list[str], keyset_port: int | None = None) -> str:
    """A bootstrap with admin and the listener on port 0 (the OS picks; read back from admin)."""
    router = json.dumps({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "bench", "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": "__FILTERS__",
    }
    clusters = []
    if keyset_port is not None:
        # The key-set server takes usage reports too (POST /usage).
        for name in ("keyset", "usage"):
            clusters.append({"name": name, "connect_timeout": "1s", "type": "STATIC",
                             "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                                 {"endpoint": {"address": {"socket_address": {
                                     "address": "127.0.0.1", "port_value": keyset_port}}}}]}]}})
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{"name": "bench", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": clusters,
        },
    }
    head, tail = json.dumps(boot).split('"__FILTERS__"')
    return head + "[" + ",".join(filters + [router]) + "]" + tail


# ---- the key-set endpoint -----------------------------------------------------------------------

class KeySetServer:
    """Serves a directory over HTTP/1.1 keep-alive on 127.0.0.1, with ETag and If-None-Match."""

    def __init__(self, root: Path):
        root = root.resolve()
        self.root = root
        self.counts = {"requests": 0, "aborted": 0, "reports": 0}
        counts = self.counts
        etags: dict[Path, tuple[float, str]] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                counts["requests"] += 1
                path = (root / self.path.split("?")[0].lstrip("/")).resolve()
                if not path.is_file() or root not in path.parents:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = path.read_bytes()
                mtime = path.stat().st_mtime
                if etags.get(path, (None,))[0] != mtime:
                    etags[path] = (mtime, '"' + hashlib.sha256(body).hexdigest() + '"')
                tag = etags[path][1]
                if self.headers.get("if-none-match") == tag:
                    self.send_response(304)
                    self.send_header("etag", tag)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("etag", tag)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 (http.server's naming): a usage report, taken
                self.rfile.read(int(self.headers.get("content-length") or 0))
                counts["reports"] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

            def handle_error(self, request, client_address):
                # Envoy gave up on a fetch (its timeout, or it is stopping): counted, not printed.
                if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    counts["aborted"] += 1
                else:
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def publish(keys: Keys, out: Path, version: int) -> None:
    """The live key-set layout (README, "Key distribution") of `keys` in `out`, as the `keygate`
    command writes it: `keygate config --keys FILE --shards out`."""
    digits = 2 if keys.n >= 100_000 else 1
    keys_file = out.parent / "keys.json"
    with open(keys_file, "w") as f:
        f.write('{"keys": [\n')
        f.write(",\n".join(keys.record(i) for i in range(keys.n)))
        f.write("\n]}\n")
    try:
        run = subprocess.run([str(KEYGATE), "config", "--keys", str(keys_file), "--shards", str(out),
                              "--digits", str(digits), "--manifest-version", str(version)],
                             capture_output=True, text=True)
    finally:
        keys_file.unlink(missing_ok=True)
    if run.returncode != 0:
        raise RuntimeError(f"keygate config --shards failed ({run.returncode}): {run.stderr.strip()}")
    log(run.stderr.strip())


# ---- running Envoy ------------------------------------------------------------------------------

class Variant:
    """Everything needed to start one variant with n keys: its config file, and key-set server."""

    KEY_SET = {"cluster": "keyset", "authority": "keys.internal", "path": "/manifest.json", "timeout_ms": 10_000}
    # A report every second (the shortest interval; the default is 10 s), so each measured run
    # includes several POSTs and the ticks at their fastest (100 ms): the costlier case.
    USAGE = {"cluster": "usage", "authority": "usage.internal", "path": "/usage", "flush_interval_ms": 1000,
             "timeout_ms": 500}
    PUBLISHED_VERSION = 1

    def __init__(self, name: str, n: int, work: Path):
        self.name, self.n = name, n
        self.keys = keys_for(n)       # every variant is sent the same bench key
        self.dir = work / f"{name}-{n}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "envoy.json"
        self.server: KeySetServer | None = None
        t = time.monotonic()
        keyset_port = None
        if self.live:
            publish(self.keys, self.dir / "keyset", version=self.PUBLISHED_VERSION)
            self.server = KeySetServer(self.dir / "keyset")
            keyset_port = self.server.port
        if name in KEYGATE_VARIANTS:
            usage = self.USAGE if name.endswith("-usage") else None
            keygate = (keygate_configuration(None, self.KEY_SET, usage) if self.live
                       else keygate_configuration(self.keys, None))
        if name == "none":
            filters = []
        elif name == "noop":
            filters = [wasm_filter("noop", NOOP_WASM, "")]
        elif name == "floor":
            filters = [wasm_filter("floor", FLOOR_WASM, self.keys.records())]
        elif name == "api_key_auth":
            filters = [api_key_auth_filter(self.keys)]
        elif name in ("wasm-inline", "wasm-live", "wasm-live-usage"):
            filters = [wasm_filter("keygate", KEYGATE_WASM, keygate)]
        elif name in ("native-inline", "native-live", "native-live-usage"):
            filters = [keygate_native_filter(keygate)]
        else:
            raise ValueError(name)
        text = envoy_config(filters, keyset_port)
        self.config.write_text(text)
        log(f"{name} with {n} keys: {len(text) / 1e6:.1f} MB configuration in {time.monotonic() - t:.1f} s")

    @property
    def live(self) -> bool:
        """keygate with a live key set: ready once the whole set is loaded."""
        return "-live" in self.name

    @property
    def native(self) -> bool:
        """keygate's native module, whose stats Envoy prefixes `dynamicmodulescustom.`."""
        return self.name.startswith("native-")

    @property
    def stats_prefix(self) -> str:
        return "dynamicmodulescustom." if self.native else "wasmcustom."

    @property
    def bench_key(self) -> str:
        return self.keys.bench_key

    def close(self):
        if self.server:
            self.server.close()
            self.server = None


class Envoy:
    """One running Envoy; `ready()` waits for admin /ready LIVE (and the whole key set when live)."""

    def __init__(self, variant: Variant, concurrency: int):
        self.variant = variant
        self.dir = variant.dir
        addr_file = self.dir / f"admin-address-{os.getpid()}"
        addr_file.unlink(missing_ok=True)
        self.addr_file = addr_file
        self.log = open(self.dir / "envoy.log", "wb")
        env = dict(os.environ)
        if variant.native:
            env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(KEYGATE_NATIVE.parent)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(variant.config), "--concurrency", str(concurrency), "--disable-hot-restart",
             "-l", os.environ.get("ENVOY_LOG_LEVEL", "warning"), "--admin-address-path", str(addr_file)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.pid = self.proc.pid
        self.admin = ""
        self.port = 0

    def get(self, path: str, timeout: float = 2) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as r:
            return r.read().decode()

    def ready(self, timeout: float) -> float:
        """Seconds from spawn until ready; raises TimeoutError or RuntimeError."""
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Envoy exited ({self.proc.returncode}): {self.failure()}")
            if not self.admin and self.addr_file.exists():
                self.admin = self.addr_file.read_text().strip()
            if self.admin:
                try:
                    if self.get("/ready").strip() == "LIVE" and (not self.variant.live or self.key_set_loaded()):
                        elapsed = time.monotonic() - self.t0
                        self.port = self.listener_port()
                        return elapsed
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        raise TimeoutError

    def settle(self, timeout: float, idle: float = 0.1) -> float:
        """Seconds from spawn until Envoy's CPU use over 1 s falls below `idle` of a core.

        Ready is not the end of start-up work: a second key-set sync, say, may still be running.
        """
        deadline = self.t0 + timeout
        while time.monotonic() < deadline:
            before, t = self.cpu_seconds(), time.monotonic()
            time.sleep(1)
            if (self.cpu_seconds() - before) / (time.monotonic() - t) < idle:
                return time.monotonic() - self.t0
        raise TimeoutError

    def failure(self) -> str:
        """The error and critical lines of Envoy's log, shortened, for a report cell."""
        text = (self.dir / "envoy.log").read_text(errors="replace")
        msgs = []
        for line in text.splitlines():
            if "][error][" in line or "][critical][" in line:
                msg = line.rsplit("] ", 1)[-1].replace("wasm log keygate keygate: ", "").strip()
                if msg and msg not in msgs:
                    msgs.append(msg)
        if not msgs:
            return f"Envoy exited with {self.proc.returncode}"
        # The first line says why (a wasm panic message spans three log lines).
        first = " ".join(msgs[:3]) if "memory allocation" in msgs[0] else msgs[0]
        return first[:120] + ("…" if len(first) > 120 else "")

    def key_set_loaded(self) -> bool:
        """The live key set's gauges show the published version with every key in it."""
        prefix = self.variant.stats_prefix + "keygate.key_set."
        stats = {}
        for line in self.get("/stats?filter=keygate.key_set").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix):
                stats[name.removeprefix(prefix)] = value
        return (stats.get("version") == str(Variant.PUBLISHED_VERSION)
                and stats.get("keys") == str(self.variant.n))

    def stat(self, name: str) -> int | None:
        for line in self.get(f"/stats?filter=^{re.escape(name)}$").splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return None

    def listener_port(self) -> int:
        listeners = json.loads(self.get("/listeners?format=json"))
        return int(listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / TICK     # utime, stime (fields 14 and 15)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def comm(self) -> str:
        return Path(f"/proc/{self.pid}/comm").read_text().strip()

    def request(self, path: str, key: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()
        self.addr_file.unlink(missing_ok=True)


# ---- wrk ----------------------------------------------------------------------------------------

INVALID_LUA = """
-- A different invalid key (right format, unknown) on every request, from a pool built up front.
local reqs, n = {}, 0
function init(args)
  math.randomseed(%d)
  for i = 1, 4096 do
    local t = {}
    for j = 1, 72 do t[j] = string.format("%%x", math.random(0, 15)) end
    local hex = table.concat(t)
    local key = "sk_live_" .. hex:sub(1, 8) .. "_" .. hex:sub(9, 72)
    reqs[i] = wrk.format("GET", "%s", {["Authorization"] = "Bearer " .. key})
  end
end
function request()
  n = n %% #reqs + 1
  return reqs[n]
end
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk(port: int, seconds: float, case: str, key: str, script: Path) -> dict:
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if case == "accepted":
        cmd += ["-H", f"Authorization: Bearer {key}"]
    else:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}{PATH}"], capture_output=True, text=True,
                         timeout=seconds + 30, start_new_session=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    lat = {p: float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(m.group(1)), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


# ---- CPU part -----------------------------------------------------------------------------------

def keep_log(envoy: Envoy, tag: str) -> str:
    """Copies a failed Envoy's log to target/bench/logs/ (the work directory is removed at the end)."""
    dest = ROOT / "target/bench/logs" / f"{tag}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(envoy.dir / "envoy.log", dest)
    return str(dest.relative_to(ROOT))


def start(v: Variant, concurrency: int, tag: str) -> tuple[Envoy, dict]:
    """Starts Envoy and waits until it is ready and then idle; on failure, info has 'error'."""
    envoy = Envoy(v, concurrency)
    info: dict = {}
    try:
        info["ready"] = envoy.ready(SCALE_TIMEOUT)
        info["rss_ready"] = envoy.rss_mib()
        info["settled"] = envoy.settle(SCALE_TIMEOUT)
        info["rss_settled"] = envoy.rss_mib()
    except TimeoutError:
        info["error"] = f"timeout (> {SCALE_TIMEOUT:.0f} s)"
        info["rss_ready"] = info.get("rss_ready", envoy.rss_mib() if envoy.proc.poll() is None else float("nan"))
    except RuntimeError as e:
        info["error"] = str(e)
    if "error" in info:
        info["log"] = keep_log(envoy, tag)
        log(f"{tag}: {info['error']} (log: {info['log']})")
    return envoy, info


def cpu_part(work: Path, lines: list[str], verdicts: list[tuple[str, bool | None, str]]):
    script = work / "invalid.lua"
    script.write_text(INVALID_LUA % (12345, PATH))
    variants = {name: Variant(name, CPU_KEYS, work) for name in CPU_VARIANTS}
    # Every variant has a (maybe empty) list, so ratios against one not run (VARIANTS) are "—".
    samples: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in LABELS} for c in CASES}
    ready_times: dict[str, list[float]] = {v: [] for v in CPU_VARIANTS}
    failed: dict[str, str] = {}
    try:
        for rnd in range(ROUNDS):
            # Rotate the order each round so no variant always runs first or last.
            order = CPU_VARIANTS[rnd % len(CPU_VARIANTS):] + CPU_VARIANTS[:rnd % len(CPU_VARIANTS)]
            for name in order:
                if name in failed:
                    continue
                v = variants[name]
                envoy, info = start(v, 1, f"cpu-{name}-{CPU_KEYS}")
                try:
                    if "error" in info:
                        failed[name] = info["error"]
                        continue
                    ready_times[name].append(info["ready"])
                    if rnd == 0:
                        check_variant(envoy, name)
                    wrk(envoy.port, WARMUP_S, "accepted", v.bench_key, script)
                    cases = list(CASES) if rnd % 2 == 0 else list(CASES)[::-1]
                    for case in cases:
                        before = envoy.cpu_seconds()
                        r = wrk(envoy.port, DURATION, case, v.bench_key, script)
                        r["cpu_us"] = (envoy.cpu_seconds() - before) / r["requests"] * 1e6
                        refused = case == "invalid" and name in REFUSING
                        if r["non2xx"] != (r["requests"] if refused else 0):
                            raise RuntimeError(f"{name}/{case}: {r['non2xx']} of {r['requests']} answers not 2xx")
                        samples[case][name].append(r)
                        log(f"round {rnd + 1}/{ROUNDS} {name:13} {case:8} {r['cpu_us']:7.1f} us/req "
                            f"{r['rps']:9.0f} req/s p50 {r['p50']:.3f} ms p99 {r['p99']:.3f} ms")
                finally:
                    envoy.stop()
    finally:
        for v in variants.values():
            v.close()

    lines.append(f"### CPU per request ({CPU_KEYS:,} keys, `--concurrency 1`, {ROUNDS} interleaved rounds of "
                 f"{DURATION} s, wrk `-t1 -c{CONNECTIONS}`)")
    lines.append("")
    lines.append("Medians over the rounds; each ratio is the median of the per-round ratios (same conditions).")
    lines.append("")
    for case, title in CASES.items():
        lines.append(f"**{title}**" + (" (`GET /v1/venues/v_7/treatments`, key with the route's scope, bound "
                                       "to venue v_7: hash, lookup, scope, binding, identity headers)"
                                       if case == "accepted" else
                                       " (a different unknown `sk_live_` key on every request, from a pool of "
                                       "4096 cycled by a wrk Lua script; 401 from `api_key_auth`, the floor filter "
                                       "and keygate, 200 from the rest, which check nothing)"))
        lines.append("")
        lines.append("| variant | Envoy CPU µs/request | ÷ no filter | ÷ no-op wasm | ÷ floor wasm | ÷ keygate wasm "
                     "| requests/s | p50 ms | p99 ms |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in CPU_VARIANTS:
            s = samples[case][name]
            if not s:
                lines.append(f"| {LABELS[name]} | did not start: {failed.get(name, '?')} | | | | | | | |")
                continue
            twin = WASM_TWIN.get(name)
            lines.append(f"| {LABELS[name]} | {med(s, 'cpu_us'):.1f} | "
                         f"{fmt(per_round_ratio(s, samples[case]['none']))} | "
                         f"{fmt(per_round_ratio(s, samples[case]['noop']))} | "
                         f"{fmt(per_round_ratio(s, samples[case]['floor']))} | "
                         f"{fmt(per_round_ratio(s, samples[case][twin])) if twin else '—'} | "
                         f"{med(s, 'rps'):.0f} | {med(s, 'p50'):.3f} | {med(s, 'p99'):.3f} |")
        lines.append("")
    lines.append("÷ keygate wasm: each native variant against keygate's wasm filter with the same key source.")
    lines.append("")
    lines.append("Time to ready at `--concurrency 1` (median): " + "; ".join(
        f"{LABELS[n]}: {statistics.median(ready_times[n]):.2f} s" for n in CPU_VARIANTS if ready_times[n]) + ".")
    lines.append("")

    big = CPU_KEYS >= 1_000_000
    accepted = samples["accepted"]

    def at_most(what: str, name: str, base: str, bound: float):
        """Accepted request: `name`'s CPU/request ≤ bound × `base`'s (a target stated at 1M keys)."""
        r = per_round_ratio(accepted[name], accepted[base])
        why = failed.get(name) or failed.get(base) or "?"
        verdicts.append((f"Accepted request, {CPU_KEYS:,} keys, {LABELS[name]}: CPU/request ≤ {bound:.2f} × {what}",
                         (r <= bound if r == r else False) if big else None,
                         (f"{against(r, bound)} ×" if r == r else f"did not start: {why[:120]}")
                         + ("" if big else " (not 1M keys: indicative only)")))

    def flood(name: str):
        r = per_round_ratio(samples["invalid"][name], accepted[name])
        verdicts.append((f"Invalid-key flood, {CPU_KEYS:,} keys, {LABELS[name]}: CPU/request ≤ accepted request's",
                         r <= 1.0 if r == r else None,
                         f"{against(r, 1.0)} × the accepted request's" if r == r else "did not start"))

    for name in ("wasm-inline", "wasm-live"):
        at_most("the floor wasm filter", name, "floor", 1.05)
    for name in ("wasm-inline", "wasm-live"):
        flood(name)
    for name in ("native-inline", "native-live"):
        at_most("no filter", name, "none", 1.10)
        at_most(f"{LABELS[WASM_TWIN[name]]}", name, WASM_TWIN[name], 0.60)
    for name in ("native-inline", "native-live"):
        flood(name)
    for name, base in WITHOUT_USAGE.items():
        at_most(LABELS[base], name, base, 1.03)


def fmt(x: float) -> str:
    return f"{x:.2f}" if x == x else "—"


def against(r: float, bound: float) -> str:
    """A ratio for a verdict: two decimals, or three where two would read as the bound itself (a
    1.104 that misses ≤ 1.10 is not printed as 1.10)."""
    return f"{r:.3f}" if f"{r:.2f}" == f"{bound:.2f}" else f"{r:.2f}"


def check_variant(envoy: Envoy, name: str):
    """Before the first measurement: the comm is Envoy's, and each variant answers as it should."""
    if envoy.comm() != "envoy":
        raise RuntimeError(f"PID {envoy.pid} is {envoy.comm()!r}, not envoy")
    key = envoy.variant.bench_key
    wrong = "sk_live_00000000_" + "0" * 64
    got = (envoy.request(PATH, key), envoy.request(PATH, wrong), envoy.request("/v1/venues/v_8/treatments", key))
    want = {"none": (200, 200, 200), "noop": (200, 200, 200), "api_key_auth": (200, 401, 200),
            "floor": (200, 401, 200)}.get(name, (200, 401, 403))      # keygate checks the venue binding too
    if got != want:
        raise RuntimeError(f"{name}: answers {got} to (valid key, unknown key, other venue), expected {want}")
    if name in KEYGATE_VARIANTS:
        allowed = envoy.stat(envoy.variant.stats_prefix + "keygate.allowed")
        if allowed != 1:
            raise RuntimeError(f"{name}: keygate.allowed is {allowed}, expected 1")


def per_round_ratio(a: list[dict], b: list[dict], key: str = "cpu_us") -> float:
    pairs = list(zip(a, b))
    return statistics.median(x[key] / y[key] for x, y in pairs) if pairs else float("nan")


def med(s: list[dict], key: str) -> float:
    return statistics.median(x[key] for x in s)


# ---- scale part ---------------------------------------------------------------------------------

def scale_part(work: Path, lines: list[str], verdicts: list[tuple[str, bool | None, str]]):
    script = work / "invalid.lua"
    script.write_text(INVALID_LUA % (12345, PATH))
    results: dict[tuple[str, str, int], dict] = {}
    for size in SCALE:
        n = SIZES[size]
        for name in SCALE_VARIANTS:
            v = Variant(name, n, work)
            try:
                for conc in SCALE_CONCURRENCY:
                    if v.server:
                        v.server.counts.update(requests=0, aborted=0)
                    envoy, res = start(v, conc, f"scale-{name}-{size}-c{conc}")
                    try:
                        if "error" not in res:
                            if envoy.request(PATH, v.bench_key) != 200:
                                raise RuntimeError("the bench key is refused")
                            r = wrk(envoy.port, 2, "accepted", v.bench_key, script)
                            res["rss_load"] = envoy.rss_mib()
                            res["warm_requests"] = r["requests"]
                    finally:
                        envoy.stop()
                    if v.server:
                        res["fetches"] = dict(v.server.counts)
                    results[(size, name, conc)] = res
                    log(f"scale {size:4} {name:13} c{conc}: " + ", ".join(
                        f"{k} {x:.1f}" if isinstance(x, float) else f"{k} {x}" for k, x in res.items()))
            finally:
                v.close()
                shutil.rmtree(v.dir, ignore_errors=True)

    lines.append("### Memory and start-up")
    lines.append("")
    lines.append("Ready: from spawn until admin `/ready` is LIVE and, for a live key set, the `key_set.version` "
                 "gauge shows the published version and `key_set.keys` the key count. Idle: until Envoy's CPU over 1 s falls below 10 % of a core (start-up "
                 "work that goes on after ready; sampled in 1 s windows, so at least ready + 1 s). Resident memory is VmRSS; after load = after 2 s of accepted "
                 "requests (wrk `-c16`), which reach every worker. Key-set fetches: requests the endpoint served "
                 "(1 manifest + 256 shards is one full load), and how many Envoy abandoned mid-reply.")
    lines.append("")
    lines.append("| keys | variant | concurrency | ready s | idle s | RSS ready MiB | RSS idle MiB "
                 "| RSS after load MiB | key-set fetches |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for size in SCALE:
        for name in SCALE_VARIANTS:
            for conc in SCALE_CONCURRENCY:
                r = results[(size, name, conc)]
                f = r.get("fetches")
                fetches = f"{f['requests']} ({f['aborted']} abandoned)" if f else "—"
                if "error" in r:
                    cells = f"{r['error']} | | | | | {fetches}"
                else:
                    cells = (f"{r['ready']:.1f} | {r['settled']:.1f} | {r['rss_ready']:.0f} | {r['rss_settled']:.0f} "
                             f"| {r['rss_load']:.0f} | {fetches}")
                lines.append(f"| {SIZES[size]:,} | {LABELS[name]} | {conc} | {cells} |")
    lines.append("")

    if "1m" in SCALE:
        def get(name, conc, k):
            return results.get(("1m", name, conc), {}).get(k)

        def check(what, a, b, ok, figure):
            verdicts.append((what, None if a is None or b is None else ok(a, b),
                             "n/a (a run failed)" if a is None or b is None else figure(a, b)))
        # The wasm filter's targets (growth ≤ 10 %) and the native module's (growth ≤ 5 %).
        for name, growth in (("wasm-live", 0.10), ("native-live", 0.05)):
            label = LABELS[name]
            for conc in SCALE_CONCURRENCY:
                check(f"1M keys, `--concurrency {conc}`, {label}: RSS ≤ ½ × `api_key_auth`'s (after load)",
                      get(name, conc, "rss_load"), get("api_key_auth", conc, "rss_load"), lambda a, b: a <= b / 2,
                      lambda a, b: f"{a:.0f} MiB vs {b:.0f} MiB ({against(a / b, 0.5)} ×)")
            if len(SCALE_CONCURRENCY) >= 2:
                lo, hi = SCALE_CONCURRENCY[0], SCALE_CONCURRENCY[-1]
                check(f"1M keys, {label}: RSS grows ≤ {growth * 100:.0f} % from `--concurrency {lo}` to `{hi}` "
                      "(after load)",
                      get(name, lo, "rss_load"), get(name, hi, "rss_load"),
                      lambda a, b, g=growth: b <= a * (1 + g),
                      lambda a, b: f"{a:.0f} → {b:.0f} MiB ({(b / a - 1) * 100:+.1f} %)")
            for conc in SCALE_CONCURRENCY:
                check(f"1M keys, `--concurrency {conc}`, {label}: ready no later than `api_key_auth`",
                      get(name, conc, "ready"), get("api_key_auth", conc, "ready"), lambda a, b: a <= b,
                      lambda a, b: f"{a:.1f} s vs {b:.1f} s")


# ---- size part and report -----------------------------------------------------------------------

def size_part(lines: list[str], verdicts: list[tuple[str, bool | None, str]]):
    size = KEYGATE_WASM.stat().st_size
    others = [(what, path.stat().st_size) for what, path in (
        ("the no-op filter", NOOP_WASM), ("the floor filter", FLOOR_WASM), ("libkeygate.so", KEYGATE_NATIVE))
        if path.exists()]
    lines.append("### `.wasm` size")
    lines.append("")
    lines.append(f"keygate.wasm: {size:,} bytes ({size / 1024:.1f} KiB; target ≤ {SIZE_TARGET_KIB} KiB)"
                 + "".join(f"; {what}: {n:,} bytes ({n / 1024:.1f} KiB)" for what, n in others) + ".")
    lines.append("")
    verdicts.append((f"`.wasm` ≤ {SIZE_TARGET_KIB} KiB", size <= SIZE_TARGET_KIB * 1024, f"{size / 1024:.1f} KiB"))


def machine() -> str:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    out = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout
    version = (re.search(r"/(\d+\.\d+\.\d+)/", out) or re.search(r"(.*)", out.strip())).group(1)
    wrk_v = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, Linux {platform.release()}, Envoy {version}, {wrk_v}"


def main() -> int:
    if not re.fullmatch(r"lib.+\.so", KEYGATE_NATIVE.name):
        print(f"bench: KEYGATE_NATIVE must name a lib<name>.so file (Envoy loads a dynamic module by name), "
              f"not {KEYGATE_NATIVE.name}", file=sys.stderr)
        return 1
    for path, what in ((KEYGATE_WASM, "make build"), (KEYGATE_NATIVE, "make build"), (NOOP_WASM, "make bench"),
                       (FLOOR_WASM, "make bench")):
        if "size" in PARTS or "cpu" in PARTS or "scale" in PARTS:
            if not path.exists():
                print(f"bench: {path} is missing: run `{what}` first", file=sys.stderr)
                return 1
    if PARTS & {"cpu", "scale"} and not KEYGATE.is_file():
        print(f"bench: {KEYGATE} is missing: run `cargo build --release -p keygate-cli` (make bench does)",
              file=sys.stderr)
        return 1
    if shutil.which("wrk") is None and PARTS & {"cpu", "scale"}:
        print("bench: wrk is missing (make bench installs it)", file=sys.stderr)
        return 1
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ROUNDS", "DURATION", "CPU_KEYS", "SCALE", "SCALE_CONCURRENCY",
                                                    "PARTS", "CONNECTIONS") if k in os.environ)
    lines = ["## keygate benchmark", "", f"Command: `{(env + ' ') if env else ''}make bench`", "",
             f"Machine: {machine()}.", "",
             "On a shared machine absolute figures drift between runs: trust the ratios within one run.", ""]
    verdicts: list[tuple[str, bool | None, str]] = []
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="keygate-bench-", dir=ROOT / "target/bench"))
    try:
        if "cpu" in PARTS:
            cpu_part(work, lines, verdicts)
        if "scale" in PARTS:
            scale_part(work, lines, verdicts)
        if "size" in PARTS:
            size_part(lines, verdicts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines.append("### Targets")
    lines.append("")
    for what, ok, figure in verdicts:
        mark = "PASS" if ok else ("MISS" if ok is not None else "n/a ")
        lines.append(f"- {mark} {what}: {figure}")
    lines.append("")
    lines.append(f"Took {(time.monotonic() - started) / 60:.1f} minutes.")
    report = "\n".join(lines) + "\n"
    print(report)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(report)
    log(f"report saved to {OUT.relative_to(ROOT) if OUT.is_relative_to(ROOT) else OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
