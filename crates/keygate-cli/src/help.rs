//! The help text of every command.

pub const MAIN: &str = "\
keygate: makes API keys for the keygate Envoy filter, and checks its configuration

Usage: keygate <command> [options]

Commands:
  new      Make a key: print it once, and its record (which holds only the key's SHA-256)
  rotate   Revoke a key and add its successor (same org, scopes, attributes, name) in one step
  revoke   Mark keys revoked in a key-set file
  list     Show the keys of a key-set file: id, name, preview, org, scopes, dates, use, status
  hash     Print the SHA-256 of a key read from standard input
  check    Check a plugin configuration, key-set file or Envoy file by the filter's own rules
  config   Print a plugin configuration holding the keys of a key-set file
  serve    Serve a published key set over HTTP and keep the usage reports filters send

A key-set file is {\"keys\": [records]}: the filter's own key records, so it is also a valid
plugin configuration. keygate never stores a key: only its SHA-256, and a preview that holds the
last 4 characters of its secret.

Run `keygate <command> --help` for the options of a command.
Exit status: 0 success, 1 failure (or problems found by check), 2 wrong usage.
";

pub const NEW: &str = "\
Usage: keygate new --org ORG [options]

Makes a key {prefix}{id}_{secret}: an 8-hex-digit id and a 64-hex-digit secret from the
operating system's secure random source. Prints the key on standard output, once, and nothing
else there: store it now, it is kept nowhere. The key's record (its SHA-256, never the key) goes
to standard error, or with --keys into a key-set file. The record also holds created_at (now,
UTC) and preview: {prefix}{id}_… and the secret's last 4 characters, nothing else of it.

Options:
  --org ORG            Organisation the key belongs to (required)
  --scope SCOPE        A scope the key holds; repeat for more
  --attr NAME=VALUE    An attribute, such as venue=v_7, for routes' `bind`; repeat for more
  --name NAME          A label for people
  --expires WHEN       A lifetime from now (90d, 36h, 2w) or a time (2027-01-01T00:00:00Z),
                       written as an RFC 3339 time; never for no expiry
                       [default: $KEYGATE_EXPIRES if set (KEYGATE_EXPIRES=365d), else never]
  --prefix PREFIX      The key's prefix [default: sk_live_]
  --id ID              This id (8 hex digits) instead of a random one
  --keys FILE          Add the record to this key-set file, creating it if missing; an id the
                       file already has is refused
  --shards DIR         Then publish the key-set file into DIR, as keygate config --shards DIR
                       does (see keygate revoke --help)
  -h, --help           Print this help

Example:
  keygate new --org org_42 --scope venues:read --attr venue=v_7 --expires 90d --keys keys.json
";

pub const ROTATE: &str = "\
Usage: keygate rotate ID --keys FILE [--expires WHEN] [--prefix PREFIX] [--shards DIR]

In one change of the key-set FILE, marks the record ID \"revoked\": true and adds its successor:
a new id and secret, the same org, scopes, attributes and name, created_at now and its preview.
Prints the new key on standard output, once, and nothing else there. The old key stops working
as soon as Envoy runs the changed set; the new one works from then on.

The successor's expiry is what `keygate new` would give it (--expires, else $KEYGATE_EXPIRES,
else none), not the old key's. Its prefix is the old key's as its preview shows it, else
--prefix, else sk_live_. An unknown ID or one already revoked is refused and nothing is changed.

Options:
  --keys FILE        The key-set file (required)
  --expires WHEN     The successor's lifetime or expiry, as for new; never for no expiry
  --prefix PREFIX    The successor's prefix when the old record has no preview [default: sk_live_]
  --shards DIR       Then publish the key-set file into DIR, as keygate config --shards DIR
                     does (see keygate revoke --help)
  -h, --help         Print this help
";

pub const REVOKE: &str = "\
Usage: keygate revoke ID... --keys FILE [--shards DIR]

Marks the records with these ids \"revoked\": true in the key-set FILE, changing nothing else in
it. Once Envoy runs a configuration made from the file (keygate config), the filter refuses the
key exactly as an unknown one (401).

With --shards, the key set is then published into DIR, the directory a key-set endpoint serves
(keygate serve --keys DIR), as keygate config --keys FILE --shards DIR does: with as many shards
as DIR has already (16 if none) and a manifest version past the one there. A filter polling that
endpoint refuses the key from its next poll on, with no restart. It is published even when every
key named was already revoked. If publishing fails, FILE stays changed and the error says so.

Options:
  --keys FILE     The key-set file (required)
  --shards DIR    Then publish the key-set file into DIR
  -h, --help      Print this help
";

pub const LIST: &str = "\
Usage: keygate list --keys FILE [--usage FILE_OR_DIR] [--prefix PREFIX]

Prints a table of the keys in the key-set FILE: id, name, preview, org, scopes, created and
expires (UTC), last used and requests, and status (active, revoked, or expired once its expiry
has passed). The preview is the record's; a record without one shows {prefix}{id}_….

With --usage, last used and requests come from the usage reports in FILE (one report per line),
or in DIR/usage.jsonl (the directory `keygate serve --usage-dir` keeps): requests is every
request counted for the key, allowed and denied, and last used the latest time reported. A
report seen twice (the same batch_id) counts once. Without --usage they show -.

Options:
  --keys FILE            The key-set file (required)
  --usage FILE_OR_DIR    Usage reports, a file or the directory keygate serve keeps
  --prefix PREFIX        Prefix shown for a record without a preview [default: sk_live_]
  -h, --help             Print this help
";

pub const HASH: &str = "\
Usage: keygate hash < FILE
       printf %s \"$KEY\" | keygate hash

Reads one key from standard input and prints its SHA-256 in hex: the `hash` of its record. One
final line ending is ignored, so `echo \"$KEY\" | keygate hash` gives the same hash. The key is
never taken from the command line, where other users can see it (ps).

Options:
  -h, --help    Print this help
";

pub const CHECK: &str = "\
Usage: keygate check FILE...
       keygate check --envoy ENVOY_FILE...

Checks plugin configurations (or key-set files) by the filter's own rules and prints every
problem, one line each, FILE: field: message; a clean file prints FILE: ok (N keys, M routes).
With --envoy, each file is an Envoy configuration (YAML or JSON) or an Istio WasmPlugin: the
configuration.value of every keygate wasm filter in it (name, root_id, vm_id or code file naming
keygate), and the pluginConfig of every keygate WasmPlugin, is checked, and each problem is
printed as FILE:LINE: field: message. A FILE of - is standard input.
Exit status 1 if any problem is found.

Options:
  --envoy       The files are Envoy configurations or Istio WasmPlugins
  -h, --help    Print this help
";

pub const CONFIG: &str = "\
Usage: keygate config --keys FILE [--routes ROUTES.json] [--envoy ENVOY.yaml]
       keygate config --keys FILE --shards DIR [--digits N] [--manifest-version V]

Prints a plugin configuration: the keys of the key-set FILE, and the other fields (credential,
key_set, routes, unmatched, scope_implies, upstream, errors) from ROUTES.json, a configuration
without keys. The result is checked by the filter's rules before it is printed. Paste it into
Envoy's configuration.value, or an Istio WasmPlugin's pluginConfig.

With --envoy, prints ENVOY.yaml instead, with the configuration of its keygate filter (a
`value: |` block) replaced, every other line kept; without --routes, the fields other than keys
stay as that file has them.

With --shards, writes the key set in the live key-set format for a key-set endpoint (`key_set`
in the configuration) instead: DIR/shards/<prefix>.json, one per hash prefix of N hex digits
(DIR/shards/all.json for N = 0), then DIR/manifest.json listing them with their SHA-256. Each file
is replaced atomically, the manifest last, so DIR can be served while it is written.

Options:
  --keys FILE                 The key-set file (required)
  --routes ROUTES.json        The rest of the configuration [default: none: any valid key passes]
  --envoy ENVOY.yaml          Print this Envoy file with keygate's configuration replaced
  --shards DIR                Write the manifest and shards of the live key-set format into DIR
  --digits N                  Hex digits of hash prefix per shard, 0 to 4 [default: 1: 16 shards]
  --manifest-version V        The manifest's version [default: Unix seconds now]
  -h, --help                  Print this help
";

pub const SERVE: &str = "\
Usage: keygate serve --keys DIR --usage-dir DIR [--listen ADDRESS]

An HTTP/1.1 server for one machine or a demo: it serves the key set that
`keygate config --shards DIR` publishes, for the filter's key_set, and keeps the usage reports
filters send. Stop it with Ctrl-C (SIGINT) or SIGTERM: requests under way are finished first.

  GET  /PATH     The file DIR/PATH (so key_set.path is /manifest.json), with a strong ETag (the
                 SHA-256 of the body, quoted); If-None-Match with that tag answers 304. Each
                 request reads the file afresh, so a republish is served at once. Only names of
                 letters, digits, '.', '_' and '-' not starting with '.' are served (no .., no
                 %-escapes, no temporary or lock files); anything else is 404.
  POST /usage    A usage report as the filter writes it (JSON, at most 8 MiB: 413 past it;
                 400 naming the problem if it is anything else). An accepted report is appended as one line to
                 DIR/usage.jsonl, flushed to disk, then answered {\"accepted\": true}; a report
                 whose batch_id was seen before (also before a restart) is answered
                 {\"accepted\": false, \"duplicate\": true} and not stored again.

One line per request goes to standard error (address, method, path, status, bytes, time);
never a body, a query string or a header.

Options:
  --keys DIR         The directory keygate config --shards writes (required)
  --usage-dir DIR    Where usage.jsonl is kept, created if missing (required)
  --listen ADDRESS   Address and port to listen on [default: 127.0.0.1:8089]
  -h, --help         Print this help
";
