//! What a bearer token says about itself, read without verifying it: enough to turn away,
//! before any TokenReview, a token that could not pass one.
//!
//! Unverified claims are the caller's word, so they are only ever used to refuse: a token that
//! is not a JWT, is for another audience, has expired, or belongs to another subject than the
//! node agents' ServiceAccount would be refused after its review anyway, and refusing it first
//! keeps whoever sends it from making the CA call the API server. A token that passes is still
//! reviewed; nothing here ever admits one.

use base64::Engine;
use serde_json::Value;

/// Why a token is refused on its own claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimProblem {
    /// Not three base64url parts with a JSON object in the middle, or without `exp`.
    NotServiceAccountToken(String),
    /// `aud` does not contain the CA's audience: the audiences it names.
    WrongAudience(Vec<String>),
    /// `exp` is past: seconds since.
    Expired(i64),
    /// `sub` is not the node agents' ServiceAccount: the subject it names.
    WrongSubject(String),
}

/// The largest payload decoded (a kubelet-projected token's is well under 1 KiB).
const MAX_PAYLOAD_BYTES: usize = 4 * 1024;

/// Checks `token`'s claims at `now` (Unix seconds): `aud` contains `audience`, `exp` is
/// later than `now`, and `sub` is `system:serviceaccount:<namespace>:<name>` of
/// `node_account`.
pub fn check(token: &str, audience: &str, node_account: (&str, &str), now: i64) -> Result<(), ClaimProblem> {
    let not_sa = |why: &str| Err(ClaimProblem::NotServiceAccountToken(why.to_string()));
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return not_sa("it is not a JWT (three base64url parts separated by dots)");
    };
    if header.is_empty() || signature.is_empty() {
        return not_sa("it is not a signed JWT");
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return not_sa("its claims are too large for a ServiceAccount token");
    }
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return not_sa("its claims are not base64url");
    };
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&bytes) else {
        return not_sa("its claims are not a JSON object");
    };

    let audiences: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    if !audiences.iter().any(|a| a == audience) {
        return Err(ClaimProblem::WrongAudience(audiences));
    }
    // Bound ServiceAccount tokens always expire; a token without `exp` is a legacy Secret token
    // or not a Kubernetes token at all.
    let Some(exp) = claims.get("exp").and_then(|e| e.as_i64().or_else(|| e.as_f64().map(|f| f as i64)))
    else {
        return not_sa("it has no expiry (exp): the node agent presents a projected, expiring token");
    };
    if exp <= now {
        return Err(ClaimProblem::Expired(now.saturating_sub(exp)));
    }
    let (ns, name) = node_account;
    let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
    let want = format!("system:serviceaccount:{ns}:{name}");
    if subject != want {
        return Err(ClaimProblem::WrongSubject(subject.to_string()));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;

    const NODE: (&str, &str) = ("sluice-system", "sluice");
    const NOW: i64 = 1_700_000_000;

    /// A JWT with `claims` (unsigned: the signature is a placeholder, as nothing here checks it).
    pub(crate) fn jwt(claims: Value) -> String {
        let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2ln", enc(json!({"alg": "RS256", "kid": "k"})), enc(claims))
    }

    /// What the kubelet projects for the node agent.
    pub(crate) fn node_agent_claims(exp: i64) -> Value {
        json!({
            "aud": ["sluice-ca"], "exp": exp, "iat": exp - 3600, "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:sluice-system:sluice",
            "kubernetes.io": {"namespace": "sluice-system", "node": {"name": "n1", "uid": "u"},
                "pod": {"name": "sluice-a", "uid": "p"}, "serviceaccount": {"name": "sluice", "uid": "s"}}
        })
    }

    fn check_at(token: &str) -> Result<(), ClaimProblem> {
        check(token, "sluice-ca", NODE, NOW)
    }

    #[test]
    fn a_node_agents_token_passes() {
        check_at(&jwt(node_agent_claims(NOW + 60))).expect("the kubelet's token");
        let mut one_audience = node_agent_claims(NOW + 60);
        one_audience["aud"] = json!("sluice-ca");
        check_at(&jwt(one_audience)).expect("aud may be a single string");
    }

    #[test]
    fn what_is_not_a_service_account_token_is_refused() {
        for token in ["opaque-token", "a.b", "a.b.c.d", ".e30.sig", "e30.e30.", "e30.!!!.sig", "e30.W10.sig"]
        {
            assert!(matches!(check_at(token), Err(ClaimProblem::NotServiceAccountToken(_))), "{token}");
        }
        let mut no_exp = node_agent_claims(0);
        no_exp.as_object_mut().unwrap().remove("exp");
        assert!(matches!(check_at(&jwt(no_exp)), Err(ClaimProblem::NotServiceAccountToken(_))));
        let huge = jwt(json!({"aud": "sluice-ca", "pad": "x".repeat(8000)}));
        assert!(matches!(check_at(&huge), Err(ClaimProblem::NotServiceAccountToken(_))));
    }

    #[test]
    fn another_audience_is_refused_with_what_it_names() {
        let mut c = node_agent_claims(NOW + 60);
        c["aud"] = json!(["https://kubernetes.default.svc", "istio-ca"]);
        assert_eq!(
            check_at(&jwt(c)),
            Err(ClaimProblem::WrongAudience(vec![
                "https://kubernetes.default.svc".into(),
                "istio-ca".into()
            ]))
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        assert_eq!(check_at(&jwt(node_agent_claims(NOW - 5))), Err(ClaimProblem::Expired(5)));
        assert_eq!(check_at(&jwt(node_agent_claims(NOW))), Err(ClaimProblem::Expired(0)));
    }

    #[test]
    fn another_subject_is_refused() {
        // A tenant can mint a valid token for the CA's audience for its own ServiceAccount.
        let mut c = node_agent_claims(NOW + 60);
        c["sub"] = json!("system:serviceaccount:shop:web");
        assert_eq!(
            check_at(&jwt(c)),
            Err(ClaimProblem::WrongSubject("system:serviceaccount:shop:web".into()))
        );
        let mut none = node_agent_claims(NOW + 60);
        none.as_object_mut().unwrap().remove("sub");
        assert_eq!(check_at(&jwt(none)), Err(ClaimProblem::WrongSubject(String::new())));
    }
}
