//! Istio's security API as written (issue 14, points 3 and 4), end to end on a simulated node:
//! PeerAuthentication at every level (mesh-wide in the root namespace, namespace, workload,
//! port), an AuthorizationPolicy on HTTP requests (methods, paths, principals; 403
//! `RBAC: access denied`), and RequestAuthentication (JWT: 401 for an invalid token, a policy
//! requiring a request principal for a missing one).
//!
//! Every change is a manifest written to the simulator's directory; each outcome is polled for
//! with a deadline (a policy applies within a second or two of the write).

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use common::*;
use jsonwebtoken::{jwk::Jwk, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_tests::{poll_until, Pod, PodOpts, Sim, SluiceOpts};

/// How long a manifest edit may take to show.
const APPLY: Duration = Duration::from_secs(10);

fn write(sim: &Sim, file: &str, yaml: &str) -> Result<()> {
    sim.write_file(file, yaml)?;
    Ok(())
}

fn peer_authentication(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

/// Polls `what` until `pred` holds for its result, for [`APPLY`].
fn until(what: &str, mut f: impl FnMut() -> Result<Value>, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    poll_until(APPLY, || {
        last = f().unwrap_or_else(|e| json!({"harness_error": e.to_string()}));
        pred(&last).then(|| last.clone())
    })
    .with_context(|| format!("{what}: never happened; last result {last}"))
}

fn refused(r: &Value) -> bool {
    r["ok"] == false
}

/// One `simpod http-get` (GET `path` on a fresh connection) with extra headers.
fn http_get(pod: &Pod, to: SocketAddr, path: &str, headers: &[String]) -> Result<Value> {
    let mut args = vec!["http-get".to_string(), "--to".into(), to.to_string(), "--path".into(), path.into()];
    for h in headers {
        args.push("--header".into());
        args.push(h.clone());
    }
    let out = pod.run_simpod(args)?;
    out.json().with_context(|| format!("http-get output: {}", out.stderr))
}

/// One request with `method` as raw HTTP/1.1 (the server closes after answering); the status
/// line and body as received.
fn http_raw(pod: &Pod, to: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let send = format!(
        "{method} {path} HTTP/1.1\\r\\nhost: {to}\\r\\ncontent-length: 0\\r\\nconnection: close\\r\\n\\r\\n"
    );
    let out = pod.run_simpod(["raw", "--to", &to.to_string(), "--send", &send])?;
    let v = out.json().with_context(|| format!("raw output: {}", out.stderr))?;
    let text = v["received_text"].as_str().unwrap_or("").to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn status(v: &Value) -> u64 {
    v["status"].as_u64().unwrap_or(0)
}

/// A pod in a namespace outside the mesh: its connections to mesh pods are plaintext.
fn outsider(w: &World) -> Result<Pod> {
    w.sim.write_namespace("legacy", false)?;
    let known = w.sluice.get_json("/status")?["model_pods"].as_u64().unwrap_or(0);
    let pod = w.node.add_pod("legacy", "outsider", PodOpts::default())?;
    // The destination names plaintext sources from its model: let the new pod reach it.
    w.sluice.wait_for("/status", |s| s["model_pods"].as_u64().unwrap_or(0) > known, T)?;
    Ok(pod)
}

/// STRICT mesh-wide (root namespace istio-system) refuses plaintext; a namespace-wide
/// PERMISSIVE overrides it; a workload STRICT overrides that, with a port-level PERMISSIVE
/// exception for the HTTP port. Mesh clients keep working throughout.
#[test]
fn peer_authentication_mesh_namespace_workload_and_port() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let out = outsider(&w)?;
    let backend = &w.backends[0];
    let (echo, http) = (backend.addr(ECHO_PORT), backend.addr(HTTP_TARGET_PORT));
    expect_ok(&tcp_exchange(&out, echo, 16)?).context("plaintext before any PeerAuthentication")?;

    // Mesh-wide STRICT.
    write(
        &w.sim,
        "pa-mesh.yaml",
        &peer_authentication("istio-system", "default", "  mtls: {mode: STRICT}\n"),
    )?;
    until("mesh-wide STRICT refuses plaintext (echo)", || tcp_exchange(&out, echo, 16), refused)?;
    until("mesh-wide STRICT refuses plaintext (http)", || http_get(&out, http, "/", &[]), refused)?;
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?).context("mesh client under STRICT")?;
    let log = w.sluice.log_contents();
    ensure!(
        log.contains("by=PeerAuthentication istio-system/default"),
        "no refusal naming the policy:\n{log}"
    );

    // The namespace says PERMISSIVE: it wins over the mesh.
    write(&w.sim, "pa-shop.yaml", &peer_authentication("shop", "default", "  mtls: {mode: PERMISSIVE}\n"))?;
    until("namespace PERMISSIVE accepts plaintext", || tcp_exchange(&out, echo, 16), |r| r["ok"] == true)?;

    // The workload is STRICT except its HTTP port.
    write(
        &w.sim,
        "pa-web.yaml",
        &peer_authentication(
            "shop",
            "web",
            &format!(
                "  selector:\n    matchLabels: {{app: web}}\n  mtls: {{mode: STRICT}}\n  portLevelMtls:\n    {HTTP_TARGET_PORT}: {{mode: PERMISSIVE}}\n"
            ),
        ),
    )?;
    until("workload STRICT refuses plaintext (echo)", || tcp_exchange(&out, echo, 16), refused)?;
    let r = until(
        "the port-level exception accepts plaintext HTTP",
        || http_get(&out, http, "/", &[]),
        |r| status(r) == 200,
    )?;
    assert_eq!(r["body"]["name"], backend.name(), "{r}");
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?).context("mesh client under the workload policy")?;
    let got = http_get(&w.client, http_vip(), "/", &[])?;
    assert_eq!(status(&got), 200, "{got}");
    assert!(w.sluice.get_json("/status")?["counters"]["plaintext_refused_strict"].as_u64().unwrap_or(0) >= 3);

    // Without the namespace's PERMISSIVE the mesh is STRICT again, and a workload DISABLE
    // overrides it: plaintext in on every port; mesh clients keep working (they too send
    // plaintext to it, as Istio's sidecars do).
    w.sim.remove_file("pa-shop.yaml")?;
    write(
        &w.sim,
        "pa-web.yaml",
        &peer_authentication("shop", "web", "  selector:\n    matchLabels: {app: web}\n  mtls: {mode: DISABLE}\n"),
    )?;
    until("workload DISABLE accepts plaintext (echo)", || tcp_exchange(&out, echo, 16), |r| r["ok"] == true)?;
    until("workload DISABLE accepts plaintext (http)", || http_get(&out, http, "/", &[]), |r| status(r) == 200)?;
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?).context("mesh client to a DISABLE workload")?;

    // Back to the mesh-wide policy alone: STRICT everywhere again.
    w.sim.remove_file("pa-web.yaml")?;
    until("STRICT again on the echo port", || tcp_exchange(&out, echo, 16), refused)?;
    until("STRICT again on the HTTP port", || http_get(&out, http, "/", &[]), refused)?;
    Ok(())
}

const CLIENT_SA: &str = "client-sa";

/// web accepts only GET on /api/* and /health from the client's service account: everything
/// else is a 403 with Envoy's body, whoever asks and however they arrive (a mesh client, an
/// HBONE stream marked HTTP; a plaintext client, read for HTTP because an L7 policy selects the
/// pod). TCP to the pod (no request) matches no ALLOW rule that names HTTP fields: refused.
#[test]
fn l7_policy_allows_only_get_on_paths_from_one_principal() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let client = w.node.add_pod(
        "shop",
        "api-client",
        PodOpts::labels(&[("app", "api-client")]).service_account(CLIENT_SA),
    )?;
    let intruder = w.node.add_pod(
        "shop",
        "intruder",
        PodOpts::labels(&[("app", "intruder")]).service_account("intruder-sa"),
    )?;
    wait_enrolled(&w.sluice, &client)?;
    wait_enrolled(&w.sluice, &intruder)?;
    let out = outsider(&w)?;
    let direct = w.backends[0].addr(HTTP_TARGET_PORT);
    write(
        &w.sim,
        "authz-web.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-readers\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/{CLIENT_SA}\"]\n    to:\n    - operation:\n        methods: [GET]\n        paths: [\"/api/*\", \"/health\"]\n"
        ),
    )?;
    let denied = |r: &Value| status(r) == 403 && r["body"] == "RBAC: access denied";
    until("another principal is refused", || http_get(&intruder, http_vip(), "/api/items", &[]), denied)?;
    let ok = http_get(&client, http_vip(), "/api/items", &[])?;
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(ok["body"]["path"], "/api/items", "{ok}");
    assert_eq!(status(&http_get(&client, http_vip(), "/health", &[])?), 200);
    for path in ["/admin", "/api", "/healthz", "/api/../admin"] {
        let r = http_get(&client, http_vip(), path, &[])?;
        ensure!(denied(&r), "{path}: {r}");
    }
    let (code, body) = http_raw(&client, http_vip(), "POST", "/api/items")?;
    assert_eq!((code, body.as_str()), (403, "RBAC: access denied"), "POST");
    let (code, _) = http_raw(&client, http_vip(), "HEAD", "/api/items")?;
    assert_eq!(code, 403, "HEAD is not GET");
    // Plaintext HTTP straight to the pod: read for HTTP and authorized per request (no
    // principal: denied).
    let r = http_get(&out, direct, "/api/items", &[])?;
    ensure!(denied(&r), "plaintext: {r}");
    // TCP (the echo port): the ALLOW rule needs HTTP, so no rule matches the connection. The
    // destination read its first bytes (to tell HTTP from not) before refusing it, so the
    // client sees the connection end with nothing echoed (as with Envoy's network RBAC filter,
    // which closes it).
    let before = w.sluice.get_json("/status")?["counters"]["policy_denied"].as_u64().unwrap_or(0);
    let r = tcp_exchange(&client, echo_vip(), 16)?;
    ensure!(r["ok"] == false || r["received"] == 0, "TCP must be refused by an HTTP-only ALLOW: {r}");
    let after = w.sluice.get_json("/status")?["counters"]["policy_denied"].as_u64().unwrap_or(0);
    ensure!(after > before, "policy_denied {before} -> {after}");
    let counters = w.sluice.get_json("/status")?["counters"].clone();
    ensure!(counters["http_denied"].as_u64().unwrap_or(0) >= 8, "{counters}");
    ensure!(counters["inbound_sniffed"].as_u64().unwrap_or(0) >= 1, "{counters}");
    let log = w.sluice.log_contents();
    ensure!(log.contains("request denied by authorization policy (403)"), "no denial log line:\n{log}");
    Ok(())
}

const ISSUER: &str = "https://issuer.sim.test";

/// An ES256 key made for this test, its public JWKS, and tokens signed with it.
struct Issuer {
    key: EncodingKey,
    jwks: String,
}

impl Issuer {
    fn new() -> Result<Issuer> {
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("generating a P-256 key: {e}"))?;
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES256)?)?;
        jwk["kid"] = json!("sim-1");
        Ok(Issuer { key, jwks: json!({"keys": [jwk]}).to_string() })
    }

    /// A token for `sub` expiring `exp_in` seconds from now (negative: already expired).
    fn token(&self, sub: &str, exp_in: i64) -> Result<String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("sim-1".into());
        let claims = json!({"iss": ISSUER, "sub": sub, "aud": "web", "iat": now - 5, "exp": now + exp_in});
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

/// A RequestAuthentication with an inline key set, and a policy requiring a request principal:
/// a valid token passes (and is not forwarded to the application), an expired or forged one is
/// a 401 with the reason, a missing one a 403.
#[test]
fn request_authentication_valid_expired_and_missing_tokens() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let issuer = Issuer::new()?;
    write(
        &w.sim,
        "jwt-web.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: web-jwt\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  jwtRules:\n  - issuer: \"{ISSUER}\"\n    audiences: [web]\n    jwks: '{}'\n    outputClaimToHeaders:\n    - header: x-jwt-sub\n      claim: sub\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-require-jwt\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/*\"]\n",
            issuer.jwks
        ),
    )?;
    let bearer = |t: &str| vec![format!("Authorization: Bearer {t}")];
    let missing = until(
        "a request without a token is refused",
        || http_get(&w.client, http_vip(), "/", &[]),
        |r| status(r) == 403,
    )?;
    assert_eq!(missing["body"], "RBAC: access denied", "{missing}");

    let valid = issuer.token("alice", 600)?;
    let ok = http_get(&w.client, http_vip(), "/orders", &bearer(&valid))?;
    assert_eq!(status(&ok), 200, "{ok}");
    let seen = &ok["body"]["headers"];
    assert!(seen.get("authorization").is_none(), "the token is not forwarded: {seen}");
    assert_eq!(seen["x-jwt-sub"], "alice", "{seen}");

    let expired = http_get(&w.client, http_vip(), "/orders", &bearer(&issuer.token("alice", -3600)?))?;
    assert_eq!(status(&expired), 401, "{expired}");
    assert_eq!(expired["body"], "Jwt is expired", "{expired}");
    assert!(
        expired["headers"]["www-authenticate"].as_str().is_some_and(|h| h.starts_with("Bearer")),
        "{expired}"
    );

    let forged = Issuer::new()?.token("alice", 600)?;
    let r = http_get(&w.client, http_vip(), "/orders", &bearer(&forged))?;
    assert_eq!((status(&r), r["body"].as_str()), (401, Some("Jwt verification fails")), "{r}");
    let r = http_get(&w.client, http_vip(), "/orders", &bearer("not-a-jwt"))?;
    assert_eq!(status(&r), 401, "{r}");
    let counters = w.sluice.get_json("/status")?["counters"].clone();
    ensure!(
        counters["jwt_verified"].as_u64() >= Some(1) && counters["jwt_rejected"].as_u64() >= Some(3),
        "{counters}"
    );
    Ok(())
}

/// `jwksUri` naming a Service whose pod serves the key set: sluice fetches it off the data path
/// (from the node, to the Service's endpoint), and tokens it signs are accepted; `GET /jwks`
/// shows the URL's state.
#[test]
fn request_authentication_fetches_jwks_uri_from_a_pod() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let issuer = Issuer::new()?;
    // The key server: a static file served by python's http.server in a pod outside the mesh.
    let dir = w.sim.temp_dir().join("jwks-www");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("keys.json"), &issuer.jwks)?;
    w.sim.write_namespace("idp", false)?;
    let idp = w.node.add_pod("idp", "keys-0", PodOpts::labels(&[("app", "keys")]))?;
    let _server = idp.spawn(
        ["python3", "-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory"]
            .map(String::from)
            .into_iter()
            .chain([dir.display().to_string()]),
    )?;
    w.sim.write_service("idp", "keys", "10.96.0.53", &[("http", 8000, 8000)], &[&idp])?;
    write(
        &w.sim,
        "jwt-uri.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: web-jwt-uri\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  jwtRules:\n  - issuer: \"{ISSUER}\"\n    jwksUri: http://keys.idp.svc.cluster.local:8000/keys.json\n"
        ),
    )?;
    // The server may start after the first fetch: the fetch is retried (1 s, doubling) until
    // the key set is in.
    let view = w.sluice.wait_for("/jwks", |v| v[0]["keys"] == 1, Duration::from_secs(20))?;
    assert_eq!(view[0]["url"], "http://keys.idp.svc.cluster.local:8000/keys.json", "{view}");
    let bearer = vec![format!("Authorization: Bearer {}", issuer.token("carol", 600)?)];
    let ok = until(
        "a token signed with the fetched key",
        || http_get(&w.client, http_vip(), "/", &bearer),
        |r| status(r) == 200,
    )?;
    assert!(ok["body"]["headers"].get("authorization").is_none(), "{ok}");
    let forged = vec![format!("Authorization: Bearer {}", Issuer::new()?.token("carol", 600)?)];
    let r = http_get(&w.client, http_vip(), "/", &forged)?;
    assert_eq!((status(&r), r["body"].as_str()), (401, Some("Jwt verification fails")), "{r}");
    // Without an AuthorizationPolicy, a request without a token passes (Istio's default).
    assert_eq!(status(&http_get(&w.client, http_vip(), "/", &[])?), 200);
    ensure!(w.sluice.get_json("/status")?["counters"]["jwks_fetches_ok"].as_u64() >= Some(1));
    Ok(())
}
