//! Self-test of the integration-test harness (tests/common), mostly with no keygate filter: the
//! clients deliver requests unchanged through a real Envoy to the recording upstream, Envoy's
//! refusals are reported promptly, no Envoy outlives its handle, and keygate runs on the host
//! under test (`KEYGATE_TEST_HOST`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::envoy::{for_host_under_test, Host};
use common::{
    get, raw_http1, send, send_body, try_raw_http1, try_send, Envoy, EnvoyOptions, Proto, Upstream, UPSTREAM_BODY,
};

/// Paths a hostile client may send; with `normalize_path: false` they must arrive unchanged.
const RAW_PATHS: &[&str] = &[
    "/v1/venues/v_7/../v_8/x",
    "/a//b",
    "/a/%2e%2e/b",
    "/a/%2F/b",
    "/x?api_key=abc&api_key=def",
    "/./a/./b/",
    "/A/B?q=%20&q=a%26b",
    "/a\\b",
];

fn no_filter() -> (Upstream, Envoy) {
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions::new(None, upstream.port()));
    (upstream, envoy)
}

#[test]
fn paths_and_duplicate_headers_reach_upstream_unchanged() {
    let (upstream, envoy) = no_filter();
    for proto in Proto::ALL {
        for &path in RAW_PATHS {
            upstream.clear();
            let reply = get(envoy.port(), proto, path, &[("x-dup", "one"), ("X-Dup", "two"), ("x-single", "v")]);
            assert_eq!(reply.status, 200, "{proto:?} {path}: {reply:?}");
            assert_eq!(reply.body, UPSTREAM_BODY);
            assert_eq!(reply.header("Content-Type"), Some("application/json"));
            let got = upstream.single_request();
            assert_eq!(got.method, "GET");
            assert_eq!(got.path, path, "{proto:?}: path changed on the way");
            assert_eq!(got.header_values("x-dup"), ["one", "two"], "{proto:?} {path}: {:?}", got.headers);
            assert_eq!(got.header_values("X-SINGLE"), ["v"]);
        }
    }
    let completed = envoy.stat("http.ingress.downstream_rq_completed").expect("stat");
    assert!(completed >= 2 * (RAW_PATHS.len() as u64 - 1), "downstream_rq_completed = {completed}");
    assert!(envoy.stats().contains_key("cluster.upstream.upstream_rq_200"));
    assert_eq!(envoy.stat("no.such.stat"), None);
}

#[test]
fn normalize_path_option_normalises() {
    let upstream = Upstream::start();
    let mut opts = EnvoyOptions::new(None, upstream.port());
    opts.normalize_path = true;
    let envoy = Envoy::start(&opts);
    for proto in Proto::ALL {
        upstream.clear();
        assert_eq!(get(envoy.port(), proto, "/v1/venues/v_7/../v_8//x", &[]).status, 200);
        assert_eq!(upstream.single_request().path, "/v1/venues/v_8/x");
    }
}

#[test]
fn repeated_authorization_headers() {
    // Observes (and pins) how Envoy forwards a repeated Authorization header.
    let (upstream, envoy) = no_filter();
    // Envoy keeps its "inline" headers (authorization, host, user-agent, ...) as one entry and
    // joins repeats with a bare comma; other headers (x-api-key) stay separate entries.
    for proto in Proto::ALL {
        upstream.clear();
        let headers = [
            ("authorization", "Bearer one"),
            ("Authorization", "Bearer two"),
            ("x-api-key", "k1"),
            ("x-api-key", "k2"),
            ("user-agent", "u1"),
            ("user-agent", "u2"),
        ];
        let reply = get(envoy.port(), proto, "/auth", &headers);
        assert_eq!(reply.status, 200);
        let got = upstream.single_request();
        assert_eq!(got.header_values("authorization"), ["Bearer one,Bearer two"], "{proto:?}");
        assert_eq!(got.header_values("x-api-key"), ["k1", "k2"], "{proto:?}");
        assert_eq!(got.header_values("user-agent"), ["u1,u2"], "{proto:?}");
    }
    // The same for a repeated Host over HTTP/1.1.
    upstream.clear();
    assert_eq!(raw_http1(envoy.port(), b"GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status, 200);
    assert_eq!(upstream.single_request().header_values("host"), ["a,b"]);
}

#[test]
fn raw_bytes_bodies_and_methods() {
    let (upstream, envoy) = no_filter();
    let port = envoy.port();

    // A tab inside a value and a UTF-8 (non-ASCII) value, byte for byte.
    let reply = raw_http1(
        port,
        b"GET /raw HTTP/1.1\r\nHost: h\r\nX-Tab: a\tb\r\nX-High: caf\xc3\xa9\r\nX-Latin1: \xff\r\n\r\n",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = upstream.single_request();
    assert_eq!(got.path, "/raw");
    assert_eq!(got.header_values("x-tab"), ["a\tb"]);
    assert_eq!(got.header_values("x-high"), ["café"]);
    assert_eq!(got.header_values("x-latin1"), ["\u{fffd}"]);
    assert_eq!(got.header("host").as_deref(), Some("h"));

    // Something Envoy's codec refuses: a reply from Envoy (400), never the upstream.
    upstream.clear();
    let reply = try_raw_http1(port, b"GET /bad HTTP/1.1\r\nHost: h\r\nX-Nul: a\0b\r\n\r\n");
    eprintln!("NUL in a header value: {reply:?}");
    if let Ok(r) = &reply {
        assert_eq!(r.status, 400);
    }
    assert!(upstream.requests().is_empty());

    // A fragment: Envoy refuses it over HTTP/1.1; the h2 client cannot send it and says so.
    assert_eq!(raw_http1(port, b"GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n").status, 400);
    let err = try_send(port, Proto::Http2, "GET", "/a#frag", &[], b"").expect_err("h2 fragment");
    assert!(err.contains("cannot send"), "{err}");
    assert!(upstream.requests().is_empty());

    // Bodies both ways; HEAD does not hang.
    for proto in Proto::ALL {
        upstream.clear();
        let reply = send_body(port, proto, "POST", "/post", &[("content-type", "text/plain")], b"hello body");
        assert_eq!(reply.status, 200);
        let got = upstream.single_request();
        assert_eq!((got.method.as_str(), got.body.as_slice()), ("POST", &b"hello body"[..]));
        upstream.clear();
        let reply = send(port, proto, "HEAD", "/head", &[]);
        assert_eq!((reply.status, reply.body.as_str()), (200, ""));
        assert_eq!(upstream.single_request().method, "HEAD");
    }
}

#[test]
fn refused_configurations_fail_promptly() {
    let upstream = Upstream::start();

    // A wasm filter whose file does not exist.
    let mut bootstrap = EnvoyOptions::new(None, upstream.port()).bootstrap();
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_array_mut().expect("http_filters");
    filters.insert(
        0,
        serde_json::json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "keygate", "root_id": "keygate",
                    "vm_config": { "vm_id": "keygate", "runtime": "envoy.wasm.runtime.v8",
                                   "code": { "local": { "filename": "target/no-such-file.wasm" } } },
                },
            },
        }),
    );
    let started = Instant::now();
    let err = Envoy::try_start_bootstrap(&bootstrap, 1).err().expect("Envoy must refuse a missing wasm file");
    let took = started.elapsed();
    eprintln!("missing wasm refused in {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(err.contains("no-such-file.wasm"), "{err}");

    // Text that is not JSON at all.
    let started = Instant::now();
    let err = Envoy::try_start_config_text("{ not json", "json", 1).err().expect("Envoy must refuse");
    eprintln!("invalid JSON refused in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.contains("exited"), "{err}");
}

#[test]
fn recipe_file_convention() {
    let upstream = Upstream::start();
    let recipe = r#"# a recipe as shipped: fixed ports, run from the repository root
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 9901 }
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: { address: 0.0.0.0, port_value: 10000 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 10001 }
"#;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("harness-recipe.yaml");
    std::fs::write(&path, recipe).expect("write recipe");
    let envoy = Envoy::start_config_file(&path, upstream.port());
    assert_ne!(envoy.port(), 10000);
    assert_eq!(get(envoy.port(), Proto::Http1, "/recipe", &[]).status, 200);
    assert_eq!(upstream.single_request().path, "/recipe");

    // An access log on standard output goes to the instance directory.
    let logged = common::envoy::substitute_recipe(&format!("{recipe}# path: /dev/stdout\n"), 1).unwrap();
    assert!(logged.ends_with("# path: \"{{instance_dir}}/access.log\"\n"), "{logged}");

    let broken = recipe.replace("port_value: 9901", "port_value: 9902");
    let err = common::envoy::substitute_recipe(&broken, 1).expect_err("missing admin token");
    assert!(err.contains("9901"), "{err}");
}

#[test]
fn drop_leaves_no_envoy_and_log_is_readable() {
    let started = Instant::now();
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions::new(None, upstream.port()));
    eprintln!("Envoy spawn to /ready (no filter): {:?}", started.elapsed());
    let pid = envoy.pid();
    let proc_dir = format!("/proc/{pid}");
    assert!(Path::new(&proc_dir).exists());
    let reply = get(envoy.port(), Proto::Http2, "/marker-path", &[("authorization", "Bearer marker-secret")]);
    assert_eq!(reply.status, 200);
    // Envoy's own debug log dumps request headers, credentials included...
    assert!(envoy.wait_for_log("marker-secret", Duration::from_secs(5)), "debug log lacks the request");
    assert!(envoy.log().contains("all dependencies initialized. starting workers"));
    // ...which wasm_log leaves out (there is no wasm filter here, so it is empty).
    assert_eq!(envoy.wasm_log(), "");
    let dir = envoy.dir().to_path_buf();
    drop(envoy);
    assert!(!Path::new(&proc_dir).exists(), "Envoy {pid} still exists after drop");
    assert!(!dir.exists(), "instance directory not removed");
}

#[test]
fn a_panicking_test_leaves_no_envoy() {
    let upstream = Upstream::start();
    let port = upstream.port();
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let envoy = Envoy::start(&EnvoyOptions::new(None, port));
        tx.send((envoy.pid(), envoy.dir().to_path_buf())).unwrap();
        panic!("a test failing while its Envoy runs");
    })
    .join();
    assert!(outcome.is_err());
    let (pid, dir) = rx.recv().expect("Envoy started");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "Envoy {pid} outlived the panic");
    assert!(dir.join("envoy.log").exists(), "a failed test keeps the Envoy log");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_host_under_test_runs_keygate_from_a_recipe_and_from_a_generated_configuration() {
    // `KEYGATE_TEST_HOST` picks the host; a shipped recipe (written for the wasm filter) and a
    // generated configuration both run keygate there, and only there: its stats exist under that
    // host's prefix and not the other's.
    let host = Host::under_test();
    let other = if host == Host::Wasm { Host::Native } else { Host::Wasm };
    let upstream = Upstream::start();
    let recipe = Envoy::start_config_file("envoy/recipes/seaty.yaml", upstream.port());
    let generated = Envoy::start(&EnvoyOptions::new(Some(r#"{"keys": []}"#), upstream.port()));
    for envoy in [&recipe, &generated] {
        assert_eq!(envoy.host(), host);
        assert!(envoy.keygate_stat("keygate.keys").is_some(), "no keygate stats under {}", host.stats_prefix());
        assert_eq!(envoy.stat(&format!("{}keygate.keys", other.stats_prefix())), None);
        assert_eq!(get(envoy.port(), Proto::Http1, "/v1/anything", &[]).status, 401);
    }
    assert!(upstream.requests().is_empty());
}

#[test]
fn a_configuration_for_the_native_host_keeps_the_plugin_configuration_and_follows_ecds_type_urls() {
    // What `for_host_under_test` makes of an ECDS listener and its resource on the native host.
    let wasm_type = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    let listener = format!(
        "filters:\n- name: keygate\n  config_discovery:\n    type_urls: [\"{wasm_type}\"]\n    config_source: {{ ads: {{}} }}\n"
    );
    let resource = format!(
        "resources:\n- name: keygate\n  typed_config:\n    \"@type\": {wasm_type}\n    config:\n      failure_policy: FAIL_CLOSED\n      configuration:\n        \"@type\": type.googleapis.com/google.protobuf.StringValue\n        value: '{{\"keys\": []}}'\n"
    );
    let (listener, resource) = (for_host_under_test(&listener), for_host_under_test(&resource));
    if Host::under_test() == Host::Wasm {
        assert!(listener.contains(wasm_type) && resource.contains("FAIL_CLOSED"), "changed for wasm");
        return;
    }
    let listener: serde_json::Value = serde_json::from_str(&listener).unwrap();
    assert_eq!(
        listener["filters"][0]["config_discovery"]["type_urls"][0],
        "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    );
    let resource: serde_json::Value = serde_json::from_str(&resource).unwrap();
    let typed = &resource["resources"][0]["typed_config"];
    assert_eq!(typed["filter_config"]["value"], r#"{"keys": []}"#);
    assert_eq!(typed["dynamic_module_config"]["name"], "keygate");
    assert!(!resource.to_string().contains("FAIL_CLOSED") && !resource.to_string().contains(wasm_type));
}
