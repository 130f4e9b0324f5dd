//! May a connection to a mesh pod whose tunnel port (15008) refused go plaintext instead?
//!
//! The tunnel port of an enrolled pod refuses when its node's sluice is down, has not enrolled
//! it yet, or holds no certificate for it yet (the CA is slow or down). For a PERMISSIVE
//! destination sluice then sends the connection plaintext rather than black-holing it, as
//! fail-open does: the destination accepts plaintext anyway. A STRICT destination must never
//! receive plaintext from the mesh: its capture would reset it, but only after the first bytes
//! (or a whole HTTP request) were written, and if its node's sluice is down nothing resets it
//! at all; an on-path attacker resetting SYNs to 15008 could force that downgrade at will. So
//! for STRICT the answer is no, and the caller refuses (L4: reset; HTTP: 503
//! `x-sluice-error: strict-no-tunnel`), counted as `hbone_fallback_refused_strict`.
//!
//! This is the one place that decides; both the opaque (L4) and the HTTP (L7) paths ask it.

use crate::discovery::{Model, PeerAuthMode, Pod};

/// Why a fallback to plaintext was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The peer authentication mode in force for the destination pod and port.
    pub mode: PeerAuthMode,
}

/// `Ok` if a connection to `dest` on `port` may go plaintext because nobody serves the
/// destination's tunnel port; `Err` (never plaintext) if the destination requires mutual TLS.
/// `root_namespace` is Istio's (where mesh-wide PeerAuthentications live).
pub fn check(model: &Model, root_namespace: &str, dest: &Pod, port: u16) -> Result<(), Refused> {
    match peer_auth_for(model, root_namespace, dest, port) {
        // DISABLE: the destination takes plaintext from the mesh by choice.
        PeerAuthMode::Permissive | PeerAuthMode::Disable => Ok(()),
        mode @ PeerAuthMode::Strict => Err(Refused { mode }),
    }
}

/// The peer authentication mode that applies to `dest` on `port`, with Istio's precedence
/// (mesh, namespace or its annotation, workload selector, port level).
fn peer_auth_for(model: &Model, root_namespace: &str, dest: &Pod, port: u16) -> PeerAuthMode {
    crate::policy::peer_auth::effective(model, root_namespace, dest, port).mode
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Format;

    fn model(mode: &str) -> Model {
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {{sluice.dev/mesh: enabled, sluice.dev/peer-authentication: {mode}}}
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
  annotations: {{sluice.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: shop, uid: u-web}}
spec: {{serviceAccountName: web, nodeName: node-2}}
status: {{podIP: 10.244.2.10}}
---
apiVersion: v1
kind: Pod
metadata: {{name: api-1, namespace: plain, uid: u-api}}
spec: {{serviceAccountName: api, nodeName: node-2}}
status: {{podIP: 10.244.2.11}}
"#
        );
        Model::from_manifest(&text, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn strict_destination_never_falls_back() {
        let m = model("STRICT");
        let web = m.pod("shop", "web-1").unwrap();
        assert_eq!(check(&m, "istio-system", web, 8080), Err(Refused { mode: PeerAuthMode::Strict }));
        // A namespace without the annotation is PERMISSIVE, as in Istio.
        let api = m.pod("plain", "api-1").unwrap();
        assert_eq!(check(&m, "istio-system", api, 8080), Ok(()));
    }

    #[test]
    fn permissive_destination_falls_back() {
        let m = model("PERMISSIVE");
        let web = m.pod("shop", "web-1").unwrap();
        assert_eq!(check(&m, "istio-system", web, 9000), Ok(()));
    }
}
