//! PeerAuthentication and RequestAuthentication parsing: Istio's shapes accepted, and what
//! sluice does not implement (or Istio forbids) rejected with the field's path.

use crate::discovery::manifest::{parse, Format};
use crate::discovery::*;

fn one(yaml: &str) -> Object {
    let mut objects = parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("parse failed: {e}"));
    assert_eq!(objects.len(), 1);
    objects.remove(0)
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}"),
        Err(e) => e.to_string(),
    }
}

fn pa_doc(version: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/{version}\nkind: PeerAuthentication\nmetadata:\n  name: pa\n  namespace: shop\nspec:\n{spec}")
}

fn pa(spec: &str) -> PeerAuthentication {
    match one(&pa_doc("v1", spec)) {
        Object::PeerAuthentication(p) => (*p).clone(),
        other => panic!("not a PeerAuthentication: {other:?}"),
    }
}

/// The reason of the error for a PeerAuthentication with this spec (after the object label).
fn pa_err(spec: &str) -> String {
    let e = err(&pa_doc("v1", spec));
    e.split_once("PeerAuthentication \"shop/pa\": ").map_or(e.clone(), |(_, r)| r.to_owned())
}

#[test]
fn peer_authentication_shapes() {
    let p = pa("  mtls:\n    mode: STRICT\n");
    assert_eq!((p.mode, p.selector.is_none(), p.port_level.len()), (MtlsMode::Strict, true, 0));
    // No mtls, or no mode: UNSET (inherit).
    assert_eq!(pa("  {}\n").mode, MtlsMode::Unset);
    assert_eq!(pa("  mtls: {}\n").mode, MtlsMode::Unset);
    // An empty selector is no selector; ports as YAML numbers or JSON strings; sorted.
    let p = pa("  selector:\n    matchLabels: {app: web}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    \"9090\": {mode: STRICT}\n    8080: {mode: DISABLE}\n");
    assert_eq!(p.selector.as_ref().map(|s| s["app"].as_str()), Some("web"));
    assert_eq!(p.port_level, [(8080, MtlsMode::Disable), (9090, MtlsMode::Strict)]);
    assert!(pa("  selector: {matchLabels: {}}\n  mtls: {mode: STRICT}\n").selector.is_none());
    let Object::PeerAuthentication(p) = one(&pa_doc("v1beta1", "  mtls: {mode: DISABLE}\n")) else {
        panic!()
    };
    assert_eq!(p.mode, MtlsMode::Disable);
}

#[test]
fn peer_authentication_rejections() {
    assert_eq!(
        pa_err("  mtls: {mode: strict}\n"),
        "spec.mtls.mode: \"strict\" is not a mode (UNSET, DISABLE, PERMISSIVE, STRICT)"
    );
    assert!(
        pa_err("  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n")
            .starts_with("spec.portLevelMtls: needs a selector"),
        "{}",
        pa_err("  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n")
    );
    let e = pa_err("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    70000: {mode: STRICT}\n");
    assert!(e.starts_with("spec.portLevelMtls[70000]:"), "{e}");
    let e = pa_err("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: STRICT}\n    \"8080\": {mode: DISABLE}\n");
    assert!(e.ends_with("port 8080 is listed twice"), "{e}");
    let e = pa_err("  mtls: {mode: STRICT, strict: true}\n");
    assert!(e.starts_with("spec.mtls.strict: unknown field"), "{e}");
    let e = pa_err("  targetRef: {kind: Service, name: web}\n");
    assert!(e.starts_with("spec.targetRef: not supported"), "{e}");
}

fn ra_doc(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: ra\n  namespace: shop\nspec:\n{spec}")
}

fn ra(spec: &str) -> RequestAuthentication {
    match one(&ra_doc(spec)) {
        Object::RequestAuthentication(r) => (*r).clone(),
        other => panic!("not a RequestAuthentication: {other:?}"),
    }
}

fn ra_err(spec: &str) -> String {
    let e = err(&ra_doc(spec));
    e.split_once("RequestAuthentication \"shop/ra\": ").map_or(e.clone(), |(_, r)| r.to_owned())
}

const JWKS: &str = r#"'{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "a"}]}'"#;

#[test]
fn request_authentication_shapes() {
    let r = ra(&format!(
        "  selector: {{matchLabels: {{app: web}}}}\n  jwtRules:\n  - issuer: https://a.test\n    audiences: [web]\n    jwks: {JWKS}\n    fromHeaders: [{{name: X-Token, prefix: \"Bearer \"}}]\n    fromParams: [token]\n    fromCookies: [session]\n    forwardOriginalToken: true\n    outputPayloadToHeader: X-Payload\n    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]\n  - issuer: https://b.test\n    jwksUri: https://b.test/keys\n    timeout: 2s\n  - issuer: https://c.test\n"
    ));
    assert_eq!(r.selector["app"], "web");
    let a = &r.rules[0];
    assert!(matches!(&a.jwks, JwksSource::Inline { keys, .. } if keys.len() == 1));
    assert_eq!(a.from_headers, [JwtHeader { name: "x-token".into(), prefix: "Bearer ".into() }]);
    assert_eq!(
        (a.from_params.as_slice(), a.from_cookies.as_slice()),
        (&["token".to_string()][..], &["session".to_string()][..])
    );
    assert!(a.forward_original_token);
    assert_eq!(a.output_payload_to_header.as_deref(), Some("x-payload"));
    assert_eq!(a.output_claim_to_headers, [ClaimToHeader { header: "x-sub".into(), claim: "sub".into() }]);
    assert_eq!(r.rules[1].jwks, JwksSource::Uri("https://b.test/keys".into()));
    assert_eq!(r.rules[1].timeout, std::time::Duration::from_secs(2));
    // Neither jwks nor jwksUri: the issuer's OpenID configuration, as Istio does.
    assert_eq!(r.rules[2].jwks.fetch_url(), Some("https://c.test/.well-known/openid-configuration"));
}

#[test]
fn request_authentication_rejections() {
    assert_eq!(
        ra_err("  jwtRules:\n  - jwksUri: https://a.test/k\n"),
        "missing required field `spec.jwtRules[0].issuer`"
    );
    let e = ra_err("  jwtRules:\n  - issuer: a\n    jwks: '{\"keys\": []}'\n");
    assert!(e.starts_with("spec.jwtRules[0].jwks: no usable verification key"), "{e}");
    let e = ra_err("  jwtRules:\n  - issuer: a\n    jwksUri: ftp://a.test/k\n");
    assert!(
        e.starts_with("spec.jwtRules[0].jwksUri:") && e.contains("not an http:// or https:// URL"),
        "{e}"
    );
    let e = ra_err(
        "  jwtRules:\n  - issuer: a\n    jwksUri: https://a/k\n  - issuer: a\n    jwksUri: https://a/k\n",
    );
    assert!(
        e.starts_with("spec.jwtRules[1].issuer: issuer \"a\" is already the issuer of jwtRules[0]"),
        "{e}"
    );
    let e = ra_err("  jwtRules:\n  - issuer: a\n    jwksUri: https://a/k\n    timeout: soon\n");
    assert!(e.starts_with("spec.jwtRules[0].timeout:"), "{e}");
    let e = ra_err(
        "  jwtRules:\n  - issuer: a\n    jwksUri: https://a/k\n    fromHeaders: [{name: \"bad header\"}]\n",
    );
    assert!(e.starts_with("spec.jwtRules[0].fromHeaders[0].name:"), "{e}");
    let e = ra_err(
        "  jwtRules:\n  - issuer: a\n    jwksUri: https://a/k\n    outputClaimToHeaders: [{header: x-a}]\n",
    );
    assert_eq!(e, "missing required field `spec.jwtRules[0].outputClaimToHeaders[0].claim`");
    let e = ra_err("  jwtRules:\n  - issuer: a\n    jwksUri: https://a/k\n    forwardToken: true\n");
    assert!(e.starts_with("spec.jwtRules[0].forwardToken: unknown field"), "{e}");
    let e = ra_err("  targetRefs: [{kind: Gateway, name: gw}]\n");
    assert!(e.starts_with("spec.targetRefs: not supported"), "{e}");
}
