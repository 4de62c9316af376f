//! A real Envoy process on a generated (or a recipe's) configuration. See the module docs of
//! `common` for the recipe-file convention.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use super::client::{self, Response};

/// How long `start` waits for Envoy's admin `/ready` to say LIVE.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The recipe tokens (see the `common` module docs).
pub const RECIPE_LISTENER_PORT: u16 = 10000;
pub const RECIPE_UPSTREAM_PORT: u16 = 10001;
pub const RECIPE_ADMIN_PORT: u16 = 9901;
pub const RECIPE_WASM: &str = "target/wasm32-wasip1/release/keygate.wasm";
/// A recipe's access log on standard output; the tests write it to [`ACCESS_LOG`] instead.
pub const RECIPE_ACCESS_LOG: &str = "/dev/stdout";
/// The file in the instance directory that a recipe's access log goes to ([`Envoy::access_log`]).
pub const ACCESS_LOG: &str = "access.log";

/// The repository root (Envoy's working directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$ENVOY`, else `<repo>/.venv/bin/envoy`; panics if missing.
pub fn envoy_binary() -> PathBuf {
    let path = match std::env::var_os("ENVOY") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join(".venv/bin/envoy"),
    };
    assert!(path.is_file(), "no Envoy binary at {} (set ENVOY, or run `make envoy` first)", path.display());
    path
}

/// The `keygate` binary of the `keygate-cli` crate: `$KEYGATE_BIN`, else the one built into the same
/// target directory as the running test (`make test` builds it); panics if missing.
pub fn keygate_binary() -> PathBuf {
    let path = std::env::var_os("KEYGATE_BIN").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/<test>-<hash> → target/<profile>/keygate
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("keygate")
    });
    assert!(
        path.is_file(),
        "no keygate binary at {} (run `cargo build -p keygate-cli`, or set KEYGATE_BIN)",
        path.display()
    );
    path
}

/// `$KEYGATE_WASM`, else `<repo>/target/wasm32-wasip1/release/keygate.wasm`; panics if missing.
pub fn wasm_path() -> PathBuf {
    let path = match std::env::var_os("KEYGATE_WASM") {
        Some(p) => repo_root().join(p), // an absolute KEYGATE_WASM replaces the root
        None => repo_root().join(RECIPE_WASM),
    };
    assert!(path.is_file(), "no keygate wasm at {} (set KEYGATE_WASM, or run `make build` first)", path.display());
    path
}

/// The crash-on-demand build (`make build-probe`): `$KEYGATE_PROBE_WASM`, else
/// `<repo>/target/probe/wasm32-wasip1/release/keygate.wasm`; panics if missing.
pub fn probe_wasm_path() -> PathBuf {
    let path = std::env::var_os("KEYGATE_PROBE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/probe/wasm32-wasip1/release/keygate.wasm"));
    assert!(path.is_file(), "{} is missing: run `make build-probe` (make test does)", path.display());
    path
}

// ---- The native dynamic module (crates/keygate-native) -----------------------------------------
// `EnvoyOptions::host = Host::Native` runs the plugin configuration in `libkeygate.so` (from
// `native_dir()`, a missing module is a panic that says so) instead of the wasm filter; tests
// reach these items as `common::envoy::…`.

/// The environment variable through which Envoy finds a dynamic module by name (`lib<name>.so`).
pub const DYNAMIC_MODULES_SEARCH_PATH: &str = "ENVOY_DYNAMIC_MODULES_SEARCH_PATH";

/// Which build of keygate a generated configuration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// `envoy.filters.http.wasm` with the `.wasm` ([`wasm_path`]).
    Wasm,
    /// `envoy.filters.http.dynamic_modules` with `libkeygate.so` from [`native_dir`].
    Native,
}

/// The environment variable that picks the host a run of the suite tests (`make test` runs the
/// behavioural tests once per host).
pub const TEST_HOST: &str = "KEYGATE_TEST_HOST";

impl Host {
    /// The host this run tests: `$KEYGATE_TEST_HOST`, `wasm` (the default) or `native`; panics on
    /// anything else, so that a typo cannot quietly test the wrong one.
    pub fn under_test() -> Host {
        match std::env::var(TEST_HOST).as_deref() {
            Err(_) | Ok("wasm") => Host::Wasm,
            Ok("native") => Host::Native,
            Ok(other) => panic!("{TEST_HOST}={other:?}: expected \"wasm\" or \"native\""),
        }
    }

    /// Where Envoy puts keygate's stats: the wasm filter's under `wasmcustom.`, the dynamic
    /// module's under `dynamicmodulescustom.` (Envoy's default metrics namespace for modules).
    pub fn stats_prefix(self) -> &'static str {
        match self {
            Host::Wasm => "wasmcustom.",
            Host::Native => "dynamicmodulescustom.",
        }
    }

    /// Whether this run tests `self`; when not, says on stderr which test does not run here and
    /// why, for a test (or part of one) that only one host can do.
    pub fn tested_or_say(self, what: &str, why: &str) -> bool {
        let tested = Host::under_test() == self;
        if !tested {
            eprintln!("not on the {:?} host: {what}: {why}", Host::under_test());
        }
        tested
    }
}

const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const NATIVE_FILTER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// An Envoy configuration or ECDS file (YAML or JSON text) for the host under test
/// ([`Host::under_test`]): unchanged for the wasm filter; for the native module, every keygate
/// wasm filter in it (a typed config of type `Wasm`, wherever it sits: a listener's filter, an
/// ECDS resource) becomes the dynamic-module filter with the same plugin configuration, and every
/// ECDS `type_urls` entry follows. The result is JSON, which YAML reads too. A wasm
/// `failure_policy` has no native counterpart and is dropped: the module has no VM to fail.
/// Text that names no wasm filter is left as it is (a configuration a test means Envoy to refuse
/// included).
pub fn for_host_under_test(text: &str) -> String {
    match Host::under_test() {
        Host::Wasm => text.to_string(),
        Host::Native if !text.contains(WASM_FILTER_TYPE) => text.to_string(),
        Host::Native => {
            let mut config = yaml_to_json(text).unwrap_or_else(|e| panic!("configuration for the native host: {e}"));
            wasm_filters_to_native(&mut config);
            serde_json::to_string_pretty(&config).expect("configuration to JSON")
        }
    }
}

/// Every `Wasm` typed config in `value` as the native filter's, and `type_urls` to match.
fn wasm_filters_to_native(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if map.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                let plugin = map
                    .get("config")
                    .and_then(|c| c.pointer("/configuration/value"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("a wasm filter without a string configuration: {map:?}"))
                    .to_string();
                native_module_path();
                *value = native_filter(&plugin)["typed_config"].take();
                return;
            }
            if let Some(Value::Array(urls)) = map.get_mut("type_urls") {
                for url in urls.iter_mut() {
                    if url.as_str() == Some(WASM_FILTER_TYPE) {
                        *url = Value::from(NATIVE_FILTER_TYPE);
                    }
                }
            }
            map.values_mut().for_each(wasm_filters_to_native);
        }
        Value::Array(items) => items.iter_mut().for_each(wasm_filters_to_native),
        _ => {}
    }
}

/// One YAML document (or JSON, which is YAML) as JSON.
fn yaml_to_json(text: &str) -> Result<serde_json::Value, String> {
    let docs = yaml_documents(text)?;
    match <[serde_json::Value; 1]>::try_from(docs) {
        Ok([doc]) => Ok(doc),
        Err(docs) => Err(format!("{} YAML documents, expected one", docs.len())),
    }
}

/// Every document of a YAML stream (`---` between them) as JSON: scalars typed as YAML 1.2 reads
/// them, mapping keys as strings; anchors and aliases are refused.
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    use yaml_rust2::{Yaml, YamlLoader};
    fn convert(yaml: &Yaml) -> Result<serde_json::Value, String> {
        Ok(match yaml {
            Yaml::Null => serde_json::Value::Null,
            Yaml::Boolean(b) => json!(b),
            Yaml::Integer(i) => json!(i),
            Yaml::Real(r) => json!(r.parse::<f64>().map_err(|e| format!("{r}: {e}"))?),
            Yaml::String(s) => json!(s),
            Yaml::Array(items) => serde_json::Value::Array(items.iter().map(convert).collect::<Result<_, _>>()?),
            Yaml::Hash(map) => {
                let mut object = serde_json::Map::new();
                for (k, v) in map {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => return Err(format!("a key that is no scalar: {other:?}")),
                    };
                    object.insert(key, convert(v)?);
                }
                serde_json::Value::Object(object)
            }
            Yaml::Alias(_) | Yaml::BadValue => return Err(format!("unsupported YAML value {yaml:?}")),
        })
    }
    YamlLoader::load_from_str(text).map_err(|e| e.to_string())?.iter().map(convert).collect()
}

/// The directory holding the native module: `$KEYGATE_NATIVE_DIR`, else `<repo>/target/release`
/// (`make build-native`). Every Envoy the harness starts gets it as
/// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`; only a configuration with a dynamic module reads it.
pub fn native_dir() -> PathBuf {
    match std::env::var_os("KEYGATE_NATIVE_DIR") {
        Some(p) => repo_root().join(p), // an absolute KEYGATE_NATIVE_DIR replaces the root
        None => repo_root().join("target/release"),
    }
}

/// `libkeygate.so` in [`native_dir`]; panics if missing.
pub fn native_module_path() -> PathBuf {
    let path = native_dir().join("libkeygate.so");
    assert!(
        path.is_file(),
        "no native keygate module at {} (run `make build-native`, or set KEYGATE_NATIVE_DIR)",
        path.display()
    );
    path
}

/// The HTTP filter that runs `plugin` (keygate's JSON configuration) in the native module, loaded
/// by name from the search path.
pub fn native_filter(plugin: &str) -> serde_json::Value {
    native_module_path();
    json!({
        "name": "keygate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": { "name": "keygate" },
            "filter_name": "keygate",
            "filter_config": { "@type": "type.googleapis.com/google.protobuf.StringValue", "value": plugin },
        },
    })
}

// ---- end of the native module ---------------------------------------------------------------------

/// What to run Envoy with; build it with [`EnvoyOptions::new`] and adjust the fields.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// JSON text of the keygate plugin configuration; `None` = no wasm filter at all.
    pub plugin_config: Option<String>,
    /// Port of the recording upstream on 127.0.0.1.
    pub upstream_port: u16,
    /// `--concurrency` (worker threads). Default 1.
    pub concurrency: u32,
    /// The wasm `failure_policy` (e.g. `"FAIL_CLOSED"`); `None` omits the field.
    pub failure_policy: Option<String>,
    /// `HttpConnectionManager` `normalize_path` and `merge_slashes`. Default false: the filter
    /// sees raw paths.
    pub normalize_path: bool,
    /// Port of a key-set server on 127.0.0.1 (see [`super::keyset`]); `Some` adds a STATIC
    /// HTTP/1.1 cluster named [`KEYSET_CLUSTER`] pointing at it, for the plugin's `key_set`.
    pub keyset_port: Option<u16>,
    /// Port of a usage receiver on 127.0.0.1 (`keygate serve`, or a [`super::keyset`] server);
    /// `Some` adds a STATIC HTTP/1.1 cluster named [`USAGE_CLUSTER`] pointing at it, for the
    /// plugin's `usage`.
    pub usage_port: Option<u16>,
    /// The filter's `.wasm`; `None` is [`wasm_path`].
    pub wasm: Option<PathBuf>,
    /// Which build of keygate runs the plugin configuration: the wasm filter (the default) or the
    /// native dynamic module (see [`Host`]).
    pub host: Host,
}

/// The name of the cluster [`EnvoyOptions::keyset_port`] adds.
pub const KEYSET_CLUSTER: &str = "keyset";

/// The name of the cluster [`EnvoyOptions::usage_port`] adds.
pub const USAGE_CLUSTER: &str = "usage";

/// In a configuration or file given to [`Envoy::try_start_with_files`]: replaced by the path of
/// the instance directory, where the files are written.
pub const INSTANCE_DIR_TOKEN: &str = "{{instance_dir}}";

impl EnvoyOptions {
    pub fn new(plugin_config: Option<&str>, upstream_port: u16) -> EnvoyOptions {
        EnvoyOptions {
            plugin_config: plugin_config.map(str::to_string),
            upstream_port,
            concurrency: 1,
            failure_policy: None,
            normalize_path: false,
            keyset_port: None,
            usage_port: None,
            wasm: None,
            host: Host::under_test(),
        }
    }

    /// The Envoy bootstrap these options produce (JSON).
    pub fn bootstrap(&self) -> serde_json::Value {
        let mut http_filters = Vec::new();
        if let (Host::Native, Some(plugin)) = (self.host, &self.plugin_config) {
            http_filters.push(native_filter(plugin));
        }
        if let (Host::Wasm, Some(plugin)) = (self.host, &self.plugin_config) {
            let mut config = json!({
                "name": "keygate",
                "root_id": "keygate",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin,
                },
                "vm_config": {
                    "vm_id": "keygate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": self.wasm.clone().unwrap_or_else(wasm_path) } },
                },
            });
            if let Some(policy) = &self.failure_policy {
                config["failure_policy"] = json!(policy);
            }
            http_filters.push(json!({
                "name": "envoy.filters.http.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": config,
                },
            }));
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
        }));
        let mut clusters = vec![json!({
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                    "address": "127.0.0.1", "port_value": self.upstream_port,
                } } } }] }],
            },
        })];
        for (name, port) in [(KEYSET_CLUSTER, self.keyset_port), (USAGE_CLUSTER, self.usage_port)] {
            let Some(port) = port else { continue };
            // No protocol options: Envoy speaks HTTP/1.1 to a cluster by default.
            clusters.push(json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                        "address": "127.0.0.1", "port_value": port,
                    } } } }] }],
                },
            }));
        }
        json!({
            "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                    "filter_chains": [{ "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "codec_type": "AUTO",
                            "normalize_path": self.normalize_path,
                            "merge_slashes": self.normalize_path,
                            "route_config": {
                                "name": "local",
                                "virtual_hosts": [{
                                    "name": "all",
                                    "domains": ["*"],
                                    "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": "upstream" } }],
                                }],
                            },
                            "http_filters": http_filters,
                        },
                    }] }],
                }],
                "clusters": clusters,
            },
        })
    }
}

/// A running Envoy. Killed (SIGKILL) and reaped on Drop; its files (config, log) live in a
/// per-instance directory under the cargo target tmpdir, removed on Drop unless the thread is
/// panicking (then its path is printed).
pub struct Envoy {
    child: Child,
    port: u16,
    admin_port: u16,
    dir: PathBuf,
    /// The host its configuration runs keygate in.
    host: Host,
}

impl Envoy {
    /// Starts Envoy on a generated configuration; panics with Envoy's log tail on failure.
    pub fn start(opts: &EnvoyOptions) -> Envoy {
        Envoy::try_start(opts).unwrap_or_else(|log| panic!("Envoy did not start:\n{}", tail(&log, 80)))
    }

    /// Starts Envoy on a generated configuration. `Err` carries Envoy's whole log when it exits
    /// (refuses the configuration) or is not ready within [`READY_TIMEOUT`].
    pub fn try_start(opts: &EnvoyOptions) -> Result<Envoy, String> {
        Envoy::try_start_bootstrap(&opts.bootstrap(), opts.concurrency)
    }

    /// Starts Envoy on a bootstrap given as JSON, e.g. [`EnvoyOptions::bootstrap`] edited by a
    /// test. `Err` as for [`Envoy::try_start`].
    pub fn try_start_bootstrap(bootstrap: &serde_json::Value, concurrency: u32) -> Result<Envoy, String> {
        let config = serde_json::to_string_pretty(bootstrap).expect("bootstrap to JSON");
        launch(&config, "json", concurrency, &[], false)
    }

    /// Starts Envoy on a configuration given as text, with no recipe substitution, for the host
    /// under test ([`for_host_under_test`]); `format` is the file extension Envoy goes by: "json"
    /// or "yaml".
    pub fn try_start_config_text(config: &str, format: &str, concurrency: u32) -> Result<Envoy, String> {
        launch(config, format, concurrency, &[], true)
    }

    /// Like [`Envoy::try_start_config_text`], with files that Envoy reads at run time (an ECDS
    /// source, say), also for the host under test: each `(name, text)` of `files` is written into
    /// the instance directory before Envoy starts, and [`INSTANCE_DIR_TOKEN`] in `config` and in
    /// every file's text is replaced by that directory's path. A test changes such a file through
    /// [`Envoy::dir`], passing its text through [`for_host_under_test`].
    pub fn try_start_with_files(
        config: &str,
        format: &str,
        concurrency: u32,
        files: &[(&str, &str)],
    ) -> Result<Envoy, String> {
        launch(config, format, concurrency, files, true)
    }

    /// Starts Envoy on a hand-written configuration file (path relative to the repository root,
    /// or absolute) after the recipe substitutions; panics with Envoy's log tail on failure.
    pub fn start_config_file(path: impl AsRef<Path>, upstream_port: u16) -> Envoy {
        let path = path.as_ref();
        Envoy::try_start_config_file(path, upstream_port)
            .unwrap_or_else(|log| panic!("Envoy did not start on {}:\n{}", path.display(), tail(&log, 80)))
    }

    /// [`Envoy::start_config_file`] returning `Err` (the substitution problem or Envoy's log).
    pub fn try_start_config_file(path: impl AsRef<Path>, upstream_port: u16) -> Result<Envoy, String> {
        let path = repo_root().join(path.as_ref());
        let text = fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let config = substitute_recipe(&text, upstream_port)?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("yaml").to_string();
        launch(&config, &ext, 1, &[], true)
    }

    /// The listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The per-instance directory (config.*, envoy.log, stdio.log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Envoy's whole log so far (the `--log-path` file, then anything on stdout/stderr).
    /// Envoy writes the log file through a buffer flushed every 100 ms (see the
    /// `--file-flush-interval-msec` flag): use [`Envoy::wait_for_log`] for something just logged.
    pub fn log(&self) -> String {
        read_logs(&self.dir)
    }

    /// The log entries of Envoy's `wasm` component, each with its continuation lines: keygate's
    /// own messages (`wasm log keygate ...`) and Envoy's about the VM. Use it to assert that the
    /// filter never logs a secret: Envoy itself, at debug level, dumps every request's headers
    /// (credentials included) and the whole listener configuration (the plugin configuration
    /// included) into the full [`Envoy::log`]. Flushed like `log`.
    pub fn wasm_log(&self) -> String {
        self.component_log("wasm")
    }

    /// The log entries of Envoy's `dynamic_modules` component: the native module's own messages
    /// (`keygate: ...`) and Envoy's about loading it. The native counterpart of [`Envoy::wasm_log`].
    pub fn module_log(&self) -> String {
        self.component_log("dynamic_modules")
    }

    /// keygate's own log entries on the host this Envoy runs it in: [`Envoy::wasm_log`] or
    /// [`Envoy::module_log`].
    pub fn keygate_log(&self) -> String {
        match self.host {
            Host::Wasm => self.wasm_log(),
            Host::Native => self.module_log(),
        }
    }

    /// The host this Envoy runs keygate in.
    pub fn host(&self) -> Host {
        self.host
    }

    /// One of keygate's stats by its name without the host's prefix ([`Host::stats_prefix`]),
    /// e.g. `keygate.allowed`.
    pub fn keygate_stat(&self, name: &str) -> Option<u64> {
        self.stat(&format!("{}{name}", self.host.stats_prefix()))
    }

    /// The log entries of one Envoy component, each with its continuation lines.
    fn component_log(&self, component: &str) -> String {
        let tag = format!("][{component}]");
        log_entries(&self.log()).into_iter().filter(|entry| entry.contains(&tag)).collect::<Vec<_>>().join("\n")
    }

    /// Waits up to `timeout` for `needle` to appear in the log; returns whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The access log a recipe writes to standard output (the recipe convention's
    /// [`RECIPE_ACCESS_LOG`]), as flushed so far.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join(ACCESS_LOG)).unwrap_or_default()
    }

    /// Waits up to `timeout` for the access log to hold `lines` lines and returns them. Envoy writes
    /// a request's line once the request is over and flushes the file every 100 ms; a log that falls
    /// short is a panic showing what it holds.
    pub fn wait_for_access_log(&self, lines: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.access_log();
            let complete: Vec<String> =
                log.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| l.trim_end().to_string()).collect();
            if complete.len() >= lines {
                return complete;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {lines} access log lines after {timeout:?}:\n{log}",
                complete.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits long enough for everything logged so far to be flushed to the log file, and
    /// returns the log. Use before asserting that something is *absent* from the log.
    pub fn flushed_log(&self) -> String {
        std::thread::sleep(Duration::from_millis(400));
        self.log()
    }

    /// GET on the admin interface.
    pub fn admin_get(&self, path: &str) -> Response {
        admin_get(self.admin_port, path).unwrap_or_else(|e| panic!("admin GET {path}: {e}"))
    }

    /// Every counter and gauge (admin `/stats`, plain text), by full name,
    /// e.g. `wasmcustom.keygate.allowed`, `http.ingress.downstream_rq_2xx`.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        let body = self.admin_get("/stats").body;
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter or gauge; `None` when Envoy has no stat of that name.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats().get(name).copied()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("Envoy (pid {}) files kept in {}", self.child.id(), self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Splits an Envoy log into entries: a line starting `[20` (a timestamp) starts an entry; other
/// lines (e.g. a header dump) continue the previous one.
pub fn log_entries(log: &str) -> Vec<String> {
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        match entries.last_mut() {
            Some(last) if !line.starts_with("[20") => {
                last.push('\n');
                last.push_str(line);
            }
            _ => entries.push(line.to_string()),
        }
    }
    entries
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Applies the recipe convention (see the `common` module docs) to a configuration file's text.
pub fn substitute_recipe(text: &str, upstream_port: u16) -> Result<String, String> {
    let mut text = text.to_string();
    // (token, replacement, how many times the token may appear)
    let ports = [
        (RECIPE_LISTENER_PORT, 0, "exactly once"),
        (RECIPE_ADMIN_PORT, 0, "exactly once"),
        (RECIPE_UPSTREAM_PORT, upstream_port, "at least once"),
    ];
    for (from, to, rule) in ports {
        let yaml = format!("port_value: {from}");
        let json = format!("\"port_value\": {from}");
        let count = text.matches(&yaml).count() + text.matches(&json).count();
        let ok = if rule == "exactly once" { count == 1 } else { count >= 1 };
        if !ok {
            return Err(format!("recipe convention: `{yaml}` must appear {rule}, found {count} times"));
        }
        text = text.replace(&yaml, &format!("port_value: {to}")).replace(&json, &format!("\"port_value\": {to}"));
    }
    let access_log = format!("{INSTANCE_DIR_TOKEN}/{ACCESS_LOG}");
    let text = text
        .replace(&format!("path: {RECIPE_ACCESS_LOG}"), &format!("path: \"{access_log}\""))
        .replace(&format!("\"path\": \"{RECIPE_ACCESS_LOG}\""), &format!("\"path\": \"{access_log}\""));
    Ok(substitute_wasm(&text).replace("0.0.0.0", "127.0.0.1"))
}

/// The wasm part of the recipe convention alone: `filename: target/wasm32-wasip1/release/keygate.wasm`
/// (optionally quoted, or as JSON) becomes the wasm in use ([`wasm_path`]). For a file that holds
/// a filter configuration but no ports, such as an ECDS resource.
pub fn substitute_wasm(text: &str) -> String {
    let mut text = text.to_string();
    let wasm_tokens = [
        format!("filename: {RECIPE_WASM}"),
        format!("filename: \"{RECIPE_WASM}\""),
        format!("\"filename\": \"{RECIPE_WASM}\""),
    ];
    if wasm_tokens.iter().any(|t| text.contains(t.as_str())) {
        let wasm = serde_json::to_string(&wasm_path()).expect("path to JSON");
        let [plain, quoted, json] = wasm_tokens;
        text = text
            .replace(&json, &format!("\"filename\": {wasm}"))
            .replace(&quoted, &format!("filename: {wasm}"))
            .replace(&plain, &format!("filename: {wasm}"));
    }
    text
}

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns every Envoy from one thread that lives as long as the test process, so that
/// `PR_SET_PDEATHSIG` (which fires when the *spawning thread* exits) kills Envoy exactly when
/// the test binary dies, however it dies; an Envoy held in a `static` is not orphaned either.
fn spawn(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("envoy-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn envoy-spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, tx))
        .expect("envoy-spawner thread gone");
    rx.recv().expect("envoy-spawner thread gone")
}

/// Where the per-instance directories live.
fn instances_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("envoy")
}

/// Removes the directories left by test processes that are gone (an Envoy kept in a `static`
/// is never dropped; a killed test process drops nothing).
fn remove_stale_instances() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(dirs) = fs::read_dir(instances_root()) else {
            return;
        };
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next() else {
                continue;
            };
            if pid != std::process::id().to_string() && !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(dir.path());
            }
        }
    });
}

/// Starts Envoy on `config` with `files` in its instance directory; `for_host` passes both through
/// [`for_host_under_test`] once the instance directory is in them.
fn launch(config: &str, ext: &str, concurrency: u32, files: &[(&str, &str)], for_host: bool) -> Result<Envoy, String> {
    let for_host = |text: String| if for_host { for_host_under_test(&text) } else { text };
    remove_stale_instances();
    let dir = instances_root().join(format!("{}-{}", std::process::id(), INSTANCE.fetch_add(1, Ordering::SeqCst)));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let dir_text = dir.to_str().ok_or_else(|| format!("instance directory {} is not UTF-8", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        fs::write(&path, for_host(text.replace(INSTANCE_DIR_TOKEN, dir_text)))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let config = for_host(config.replace(INSTANCE_DIR_TOKEN, dir_text));
    let host = if config.contains(NATIVE_FILTER_TYPE) { Host::Native } else { Host::Wasm };
    let config_path = dir.join(format!("config.{ext}"));
    fs::write(&config_path, config).map_err(|e| format!("writing {}: {e}", config_path.display()))?;
    let admin_address = dir.join("admin-address");
    let stdio = fs::File::create(dir.join("stdio.log")).map_err(|e| e.to_string())?;
    let stdio2 = stdio.try_clone().map_err(|e| e.to_string())?;

    let mut cmd = Command::new(envoy_binary());
    cmd.current_dir(repo_root())
        .arg("-c")
        .arg(&config_path)
        .arg("--disable-hot-restart")
        .args(["--concurrency", &concurrency.to_string()])
        .args(["-l", "debug"])
        .arg("--log-path")
        .arg(dir.join("envoy.log"))
        .args(["--file-flush-interval-msec", "100"])
        .arg("--admin-address-path")
        .arg(&admin_address)
        .stdin(Stdio::null())
        .stdout(stdio)
        .stderr(stdio2)
        // Where Envoy finds `libkeygate.so` for a native filter (unread by a wasm-only configuration).
        .env(DYNAMIC_MODULES_SEARCH_PATH, native_dir());
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits pid_t");
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("test process gone before exec"));
            }
            Ok(())
        });
    }
    let child = spawn(cmd).map_err(|e| format!("spawning Envoy: {e}"))?;
    let mut envoy = Envoy { child, port: 0, admin_port: 0, dir, host };

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = envoy.child.try_wait() {
            return Err(format!("Envoy exited ({status}) before becoming ready:\n{}", envoy.log()));
        }
        if envoy.admin_port == 0 {
            if let Some(port) = fs::read_to_string(&admin_address)
                .ok()
                .and_then(|a| a.trim().rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            {
                envoy.admin_port = port;
            }
        }
        if envoy.admin_port != 0 {
            if let Ok(r) = admin_get(envoy.admin_port, "/ready") {
                if r.status == 200 && r.body.trim() == "LIVE" {
                    break;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("Envoy not ready within {READY_TIMEOUT:?}:\n{}", envoy.log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let listeners = admin_get(envoy.admin_port, "/listeners?format=json")?;
    let parsed: serde_json::Value =
        serde_json::from_str(&listeners.body).map_err(|e| format!("admin /listeners: {e}: {}", listeners.body))?;
    envoy.port = parsed["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("no listener port in admin /listeners: {}", listeners.body))?;
    Ok(envoy)
}

fn admin_get(admin_port: u16, path: &str) -> Result<Response, String> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    client::try_raw_http1(admin_port, request.as_bytes())
}

fn read_logs(dir: &Path) -> String {
    let mut log = fs::read(dir.join("envoy.log")).unwrap_or_default();
    log.extend(fs::read(dir.join("stdio.log")).unwrap_or_default());
    String::from_utf8_lossy(&log).into_owned()
}
