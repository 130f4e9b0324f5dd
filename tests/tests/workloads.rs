//! The workload programs of the L7 tests, pod to pod on one simulated node without sluice:
//! simpod's http-server additions, raw, ws-*, tls-*, banner-*, and slgrpc. Needs root.
//!
//! Tests run in parallel threads of one process, each with its own sim; none sweeps.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::Value;
use sluice_tests::{workloads, Pod, PodOpts, Sim};

const T: Duration = Duration::from_secs(10);
/// SHA-256 of the empty string, and of "hello".
const SHA_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const SHA_HELLO: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// A sim with one node and two pods, "srv" (10.244.1.10) and "cli" (10.244.1.11).
fn two_pods() -> Result<(Sim, Pod, Pod)> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let srv = n1.add_pod("demo", "srv", PodOpts::default())?;
    let cli = n1.add_pod("demo", "cli", PodOpts::default())?;
    Ok((sim, srv, cli))
}

fn ip_of(addr: &Value) -> String {
    addr.as_str().and_then(|a| a.rsplit_once(':')).map(|(ip, _)| ip.to_string()).unwrap_or_default()
}

#[test]
fn http_server_reports_query_body_hash_headers_and_delay() -> Result<()> {
    let (_sim, srv, cli) = two_pods()?;
    let mut http = workloads::start_http_server(&srv, 8080, "api-1", &["--delay-ms", "200"])?;
    let out = cli.run_simpod([
        "http-get",
        "--to",
        &srv.addr(8080).to_string(),
        "--path",
        "/p?a=1&b=2",
        "--header",
        "x-mirror-check: yes",
    ])?;
    let r = out.check()?.json()?;
    assert_eq!(r["status"], 200, "{r}");
    let body = &r["body"];
    assert_eq!(body["name"], "api-1");
    assert_eq!(body["path"], "/p?a=1&b=2");
    assert_eq!(body["query"], "a=1&b=2");
    assert_eq!(body["body_bytes"], 0);
    assert_eq!(body["body_sha256"], SHA_EMPTY);
    assert_eq!(r["headers"]["x-simpod-name"], "api-1");
    assert!(r["elapsed_ms"].as_u64().unwrap() >= 200, "not delayed: {r}");
    // What the backend received, as a mirror test reads it.
    let ev = http.wait_for_json(T, |v| v["event"] == "request")?;
    assert_eq!(ev["method"], "GET");
    assert_eq!(ev["path"], "/p?a=1&b=2");
    assert_eq!(ev["query"], "a=1&b=2");
    assert_eq!(ev["headers"]["x-mirror-check"], "yes");
    assert_eq!(ip_of(&ev["peer"]), cli.ip().to_string());

    // A body over raw bytes: its hash comes back, and the server closes as asked.
    let post = workloads::raw(
        &cli,
        srv.addr(8080),
        r"POST /up?x=1 HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        &[],
    )?;
    assert!(post.ok, "{post:?}");
    assert_eq!(post.ended, "eof", "{post:?}");
    let (head, json) = post.received_text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let body: Value = serde_json::from_str(json)?;
    assert_eq!(body["method"], "POST");
    assert_eq!(body["query"], "x=1");
    assert_eq!(body["body_bytes"], 5);
    assert_eq!(body["body_sha256"], SHA_HELLO);
    let ev = http.wait_for_json(T, |v| v["event"] == "request" && v["method"] == "POST")?;
    assert_eq!(ev["body_sha256"], SHA_HELLO);
    assert_eq!(ev["raw_headers"][0], serde_json::json!(["Host", "api"]));
    Ok(())
}

#[test]
fn raw_reports_eof_timeout_and_reset() -> Result<()> {
    let (_sim, srv, cli) = two_pods()?;
    let _http = workloads::start_http_server(&srv, 8080, "api-1", &[])?;
    let to = srv.addr(8080);

    // Half-closed after the request: the keep-alive server answers, then sees EOF and closes.
    let r = workloads::raw(&cli, to, r"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &["--half-close"])?;
    assert!(r.ok, "{r:?}");
    assert!(r.received_text.starts_with("HTTP/1.1 200"), "{r:?}");
    assert_eq!(r.ended, "eof");
    assert_eq!(r.sent_len, 27);
    assert_eq!(r.peer.as_deref(), Some(to.to_string().as_str()));
    assert_eq!(
        r.local.as_deref().and_then(|l| l.rsplit_once(':')).map(|(ip, _)| ip),
        Some(cli.ip().to_string().as_str())
    );

    // Not half-closed: the connection stays open, the read times out with the answer in hand.
    let r = workloads::raw(&cli, to, r"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &["--read-timeout-ms", "300"])?;
    assert!(r.received_text.starts_with("HTTP/1.1 200"), "{r:?}");
    assert_eq!(r.ended, "timeout");

    // A 100 KB line without a newline: the server gives up at 64 KiB and closes with unread
    // bytes in its socket, which resets the connection.
    let junk = "A".repeat(100_000);
    let r = workloads::raw(&cli, to, &junk, &[])?;
    assert_eq!(r.ended, "reset", "{r:?}");
    assert_eq!(r.received_len, 0);

    // --send-hex: the HTTP/2 preface, which this lenient HTTP/1.1 server takes for two
    // requests ("PRI * HTTP/2.0", then "SM").
    let out = cli.run_simpod([
        "raw",
        "--to",
        &to.to_string(),
        "--send-hex",
        "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a",
        "--half-close",
    ])?;
    let r = out.check()?.json()?;
    assert_eq!(r["sent_len"], 24);
    assert_eq!(r["ended"], "eof", "{r}");
    assert_eq!(r["received_text"].as_str().unwrap().matches("HTTP/1.1 200").count(), 2, "{r}");
    Ok(())
}

#[test]
fn websocket_echo_is_byte_exact() -> Result<()> {
    let (_sim, srv, cli) = two_pods()?;
    let mut ws = workloads::start_ws_echo_server(&srv, 8081)?;
    let url = format!("ws://{}/chat?room=1", srv.addr(8081));
    // 70 000 bytes needs the 64-bit frame length.
    let out = cli.run_simpod([
        "ws-client",
        "--url",
        &url,
        "--messages",
        "20",
        "--size",
        "70000",
        "--header",
        "x-ws-test: 1",
    ])?;
    let r = out.check()?.json()?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"], 101);
    assert_eq!(r["messages_sent"], 20);
    assert_eq!(r["messages_received"], 20);
    assert_eq!(r["bytes_received"], 20 * 70_000);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["sha256_sent"], r["sha256_received"]);
    assert_eq!(r["close_clean"], true);
    assert_eq!(r["peer"], srv.addr(8081).to_string());

    let ev = ws.wait_for_json(T, |v| v["event"] == "ws_connected")?;
    assert_eq!(ev["path"], "/chat?room=1");
    assert_eq!(ev["headers"]["x-ws-test"], "1");
    assert_eq!(ev["headers"]["upgrade"], "websocket");
    assert_eq!(ip_of(&ev["peer"]), cli.ip().to_string());
    let closed = ws.wait_for_json(T, |v| v["event"] == "ws_closed")?;
    assert_eq!(closed["messages"], 20);
    assert_eq!(closed["error"], Value::Null);

    // Text messages too.
    let out = cli.run_simpod(["ws-client", "--url", &url, "--messages", "3", "--size", "100", "--text"])?;
    assert_eq!(out.check()?.json()?["ok"], true);
    Ok(())
}

#[test]
fn tls_echo_is_byte_exact_and_checks_the_name() -> Result<()> {
    let (sim, srv, cli) = two_pods()?;
    let cert = sim.temp_dir().join("tls-backend.pem");
    let mut tls = workloads::start_tls_echo_server(&srv, 8443, &cert, &["--alpn", "h2,http/1.1"])?;
    let to = srv.addr(8443).to_string();
    let ca = cert.display().to_string();
    let client = |name: &str, bytes: u64, extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "tls-client".to_string(),
            "--to".into(),
            to.clone(),
            "--server-name".into(),
            name.into(),
            "--ca".into(),
            ca.clone(),
            "--send-bytes".into(),
            bytes.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        cli.run_simpod(args)?.json()
    };

    let r = client("tls-backend.test", 1 << 20, &["--alpn", "h2"])?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sent"], 1 << 20);
    assert_eq!(r["received"], 1 << 20);
    assert_eq!(r["sha256_sent"], r["sha256_received"]);
    assert_eq!(r["echo_exact"], true);
    assert_eq!(r["close_notify"], true);
    assert_eq!(r["version"], "TLSv1_3");
    assert!(r["cipher"].as_str().unwrap().starts_with("TLS13_"), "{r}");
    assert_eq!(r["alpn"], "h2");
    let ev = tls.wait_for_json(T, |v| v["event"] == "tls_accepted")?;
    assert_eq!(ev["sni"], "tls-backend.test");
    assert_eq!(ip_of(&ev["peer"]), cli.ip().to_string());

    // The pod IP is in the certificate too.
    let r = client(&srv.ip().to_string(), 1000, &[])?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sha256_sent"], r["sha256_received"]);

    // Any other name is refused by the client during the handshake.
    let r = client("other.test", 10, &[])?;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["stage"], "handshake");
    assert!(r["error"].as_str().unwrap().contains("not valid for name"), "{r}");
    Ok(())
}

#[test]
fn banner_arrives_before_the_client_speaks() -> Result<()> {
    let (_sim, srv, cli) = two_pods()?;
    let _banner = workloads::start_banner_server(&srv, 2525, "220 smtp.test ready")?;
    let out =
        cli.run_simpod(["banner-client", "--to", &srv.addr(2525).to_string(), "--timeout-ms", "3000"])?;
    let r = out.check()?.json()?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["banner"], "220 smtp.test ready");
    assert_eq!(r["echo"], "QUIT");
    assert!(r["banner_ms"].as_f64().unwrap() < 1000.0, "{r}");

    // Against a client-first server (echo) the banner never comes: a timeout, not a hang.
    let mut echo = srv.simpod(["echo-server", "--port", "7000"])?;
    echo.wait_listening(T)?;
    let out =
        cli.run_simpod(["banner-client", "--to", &srv.addr(7000).to_string(), "--timeout-ms", "300"])?;
    assert!(!out.success());
    let r = out.json()?;
    assert_eq!(r["stage"], "banner", "{r}");
    Ok(())
}

#[test]
fn grpc_calls_share_one_connection() -> Result<()> {
    let (_sim, srv, cli) = two_pods()?;
    let mut grpc = workloads::start_grpc_server(&srv, 9090, "grpc-1")?;
    let to = srv.addr(9090);

    let r = workloads::grpc_client(
        &cli,
        to,
        100,
        8,
        &["--metadata", "x-tenant=blue", "--payload-bytes", "1000"],
    )?;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.succeeded, 100);
    assert_eq!(r.connections, 1, "{r:?}");
    assert_eq!(r.connect_attempts, 1, "{r:?}");
    assert_eq!(r.by_server.len(), 1, "{r:?}");
    assert_eq!(r.by_server["grpc-1"], 100);
    assert_eq!(r.statuses["OK"], 100);
    // The server saw one client address (one connection), the client pod's.
    assert_eq!(r.peers.len(), 1, "{r:?}");
    let peer = r.peers.keys().next().unwrap();
    assert!(peer.starts_with(&format!("{}:", cli.ip())), "{peer}");
    let call = grpc.wait_for_json(T, |v| v["event"] == "call")?;
    assert_eq!(call["method"], "/sluice.test.Echo/Echo");
    assert_eq!(call["metadata"]["x-tenant"], "blue");
    assert_eq!(&call["peer"], peer.as_str());
    assert_eq!(call["authority"], to.to_string());

    // Failures are counted by status; --each prints one line per call.
    let out = workloads::run_slgrpc(
        &cli,
        ["client", "--to", &to.to_string(), "--calls", "3", "--fail-code", "14", "--each"],
    )?;
    assert!(!out.success());
    let lines = out.json_lines()?;
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines[..3] {
        assert_eq!(l["status"], "UNAVAILABLE", "{l}");
        assert_eq!(l["server"], "grpc-1");
    }
    let summary = &lines[3];
    assert_eq!(summary["ok"], false);
    assert_eq!(summary["statuses"]["UNAVAILABLE"], 3);
    assert_eq!(summary["by_server"]["grpc-1"], 3);

    // A deadline shorter than the server's delay.
    let r = workloads::grpc_client(&cli, to, 2, 2, &["--delay-ms", "1000", "--deadline-ms", "200"])?;
    assert_eq!(r.statuses.get("DEADLINE_EXCEEDED"), Some(&2), "{r:?}");

    // The server stream.
    let out = workloads::run_slgrpc(&cli, ["stream", "--to", &to.to_string(), "--n", "5"])?;
    let lines = out.check()?.json_lines()?;
    let items: Vec<_> = lines.iter().filter(|l| l["event"] == "item").collect();
    assert_eq!(items.len(), 5);
    let last = lines.last().unwrap();
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["received"], 5);
    assert_eq!(last["servers"], serde_json::json!(["grpc-1"]));
    assert_eq!(last["connections"], 1);

    // Nothing listens: every call is UNAVAILABLE, no connection was made.
    let r = workloads::grpc_client(&cli, srv.addr(9091), 3, 1, &[])?;
    assert!(!r.ok);
    assert_eq!(r.statuses.get("UNAVAILABLE"), Some(&3), "{r:?}");
    assert_eq!(r.connections, 0);
    ensure!(r.connect_attempts >= 1, "{r:?}");
    Ok(())
}
