//! The peer authentication mode in force for a pod and port: Istio's PeerAuthentication
//! precedence, with sluice's namespace annotation as a namespace-level shortcut.
//!
//! From the least to the most specific, each level that says something other than UNSET
//! replaces what the levels above said:
//!
//! 1. the default, PERMISSIVE;
//! 2. the mesh: the oldest PeerAuthentication without a selector in the root namespace;
//! 3. the namespace: the oldest PeerAuthentication without a selector in the pod's namespace,
//!    else the namespace annotation `sluice.dev/peer-authentication` when it is set;
//! 4. the workload: the oldest PeerAuthentication of the pod's namespace whose selector
//!    matches the pod;
//! 5. the port: that workload policy's `portLevelMtls` entry for the port the client dialled.
//!
//! Among several policies at one level, the oldest wins (creation time, then name), as in
//! Istio. The annotation is the namespace level written the short way, so a PeerAuthentication
//! for the whole namespace, being the more explicit statement, takes its place.

use std::sync::Arc;

use crate::discovery::{Model, MtlsMode, PeerAuthMode, PeerAuthentication, Pod};

/// The mode in force and what set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub mode: PeerAuthMode,
    /// `PeerAuthentication ns/name`, `port 8080 of PeerAuthentication ns/name`, `namespace
    /// annotation`, or `default`: for logs.
    pub source: String,
}

/// The mode for connections to `port` (the port the client dialled, i.e. the application's)
/// of `pod`.
pub fn effective(model: &Model, root_namespace: &str, pod: &Pod, port: u16) -> Effective {
    let mut out = Effective { mode: PeerAuthMode::Permissive, source: "default".into() };
    let mut apply = |mode: MtlsMode, source: &dyn Fn() -> String| {
        if let Some(m) = concrete(mode) {
            out.mode = m;
            out.source = source();
        }
    };
    let named = |p: &PeerAuthentication| format!("PeerAuthentication {}/{}", p.namespace, p.name);

    let mesh = model.peer_authentications(root_namespace).iter().find(|p| p.selector.is_none());
    if let Some(p) = mesh {
        apply(p.mode, &|| named(p));
    }
    let own = model.peer_authentications(&pod.namespace);
    let namespace_wide = own.iter().find(|p| p.selector.is_none());
    match namespace_wide {
        // In the root namespace, the namespace-wide policy is the mesh's, already applied.
        Some(p) if pod.namespace != root_namespace || mesh.is_none() => apply(p.mode, &|| named(p)),
        Some(_) => {}
        None => {}
    }
    if namespace_wide.is_none_or(|p| p.mode == MtlsMode::Unset) {
        if let Some(ns) = model.namespace(&pod.namespace).filter(|n| n.peer_auth_annotated) {
            let mode = match ns.peer_auth {
                PeerAuthMode::Strict => MtlsMode::Strict,
                PeerAuthMode::Permissive => MtlsMode::Permissive,
                PeerAuthMode::Disable => MtlsMode::Disable,
            };
            apply(mode, &|| "namespace annotation".into());
        }
    }
    if let Some(p) = workload_policy(own, pod) {
        apply(p.mode, &|| named(p));
        if let Some((_, mode)) = p.port_level.iter().find(|(p, _)| *p == port) {
            apply(*mode, &|| format!("port {port} of {}", named(p)));
        }
    }
    out
}

/// The oldest policy of the pod's namespace with a selector that matches it.
fn workload_policy<'m>(own: &'m [Arc<PeerAuthentication>], pod: &Pod) -> Option<&'m Arc<PeerAuthentication>> {
    own.iter().find(|p| p.selects(&pod.labels))
}

fn concrete(mode: MtlsMode) -> Option<PeerAuthMode> {
    match mode {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(PeerAuthMode::Disable),
        MtlsMode::Permissive => Some(PeerAuthMode::Permissive),
        MtlsMode::Strict => Some(PeerAuthMode::Strict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Format;

    const ROOT: &str = "istio-system";

    fn model(extra: &str) -> Model {
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, annotations: {{sluice.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: bank, annotations: {{sluice.dev/mesh: enabled, sluice.dev/peer-authentication: STRICT}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, uid: u1, labels: {{app: web}}}}
status: {{podIP: 10.0.0.1}}
---
apiVersion: v1
kind: Pod
metadata: {{name: api, namespace: shop, uid: u2, labels: {{app: api}}}}
status: {{podIP: 10.0.0.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: vault, namespace: bank, uid: u3, labels: {{app: vault}}}}
status: {{podIP: 10.0.0.3}}
---
apiVersion: v1
kind: Pod
metadata: {{name: istiod, namespace: istio-system, uid: u4, labels: {{app: istiod}}}}
status: {{podIP: 10.0.0.4}}
{extra}"#
        );
        Model::from_manifest(&text, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pa(ns: &str, name: &str, created: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\nspec:\n{spec}"
        )
    }

    fn mode(m: &Model, ns: &str, pod: &str, port: u16) -> (PeerAuthMode, String) {
        let e = effective(m, ROOT, m.pod(ns, pod).unwrap(), port);
        (e.mode, e.source)
    }

    use PeerAuthMode::{Disable, Permissive, Strict};

    #[test]
    fn default_and_annotation() {
        let m = model("");
        assert_eq!(mode(&m, "shop", "web", 80), (Permissive, "default".into()));
        assert_eq!(mode(&m, "bank", "vault", 80), (Strict, "namespace annotation".into()));
    }

    #[test]
    fn mesh_wide_then_namespace_then_workload_then_port() {
        let mesh = pa(ROOT, "default", "2024-01-01T00:00:00Z", "  mtls: {mode: STRICT}\n");
        let m = model(&mesh);
        assert_eq!(mode(&m, "shop", "web", 80), (Strict, "PeerAuthentication istio-system/default".into()));
        assert_eq!(mode(&m, "istio-system", "istiod", 80).0, Strict);
        // The annotation is the namespace level: it applies under the mesh-wide policy.
        let permissive_mesh = pa(ROOT, "default", "2024-01-01T00:00:00Z", "  mtls: {mode: PERMISSIVE}\n");
        let m = model(&permissive_mesh);
        assert_eq!(mode(&m, "bank", "vault", 80), (Strict, "namespace annotation".into()));

        let ns = pa("shop", "ns", "2024-01-02T00:00:00Z", "  mtls: {mode: PERMISSIVE}\n");
        let m = model(&format!("{mesh}{ns}"));
        assert_eq!(mode(&m, "shop", "web", 80), (Permissive, "PeerAuthentication shop/ns".into()));

        let workload = pa(
            "shop",
            "web",
            "2024-01-03T00:00:00Z",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {mode: UNSET}\n    \"9091\": {mode: PERMISSIVE}\n",
        );
        let m = model(&format!("{mesh}{ns}{workload}"));
        assert_eq!(mode(&m, "shop", "web", 80), (Strict, "PeerAuthentication shop/web".into()));
        assert_eq!(
            mode(&m, "shop", "web", 8080),
            (Disable, "port 8080 of PeerAuthentication shop/web".into())
        );
        assert_eq!(
            mode(&m, "shop", "web", 9090),
            (Strict, "PeerAuthentication shop/web".into()),
            "UNSET inherits"
        );
        assert_eq!(mode(&m, "shop", "web", 9091).0, Permissive);
        // Other pods of the namespace: the namespace policy.
        assert_eq!(mode(&m, "shop", "api", 8080), (Permissive, "PeerAuthentication shop/ns".into()));
    }

    #[test]
    fn unset_inherits_at_every_level() {
        let m = model(&format!(
            "{}{}{}",
            pa(ROOT, "default", "2024-01-01T00:00:00Z", "  mtls: {mode: STRICT}\n"),
            pa("shop", "ns", "2024-01-02T00:00:00Z", "  mtls: {mode: UNSET}\n"),
            pa(
                "shop",
                "w",
                "2024-01-02T00:00:00Z",
                "  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    80: {mode: PERMISSIVE}\n"
            ),
        ));
        assert_eq!(mode(&m, "shop", "web", 81).0, Strict);
        assert_eq!(mode(&m, "shop", "web", 80).0, Permissive);
        assert_eq!(mode(&m, "shop", "api", 80).0, Strict);
        // A namespace policy that is UNSET leaves the annotation in force.
        let m = model(&pa("bank", "ns", "2024-01-02T00:00:00Z", "  mtls: {mode: UNSET}\n"));
        assert_eq!(mode(&m, "bank", "vault", 80), (Strict, "namespace annotation".into()));
        // One that says something replaces the annotation.
        let m = model(&pa("bank", "ns", "2024-01-02T00:00:00Z", "  mtls: {mode: PERMISSIVE}\n"));
        assert_eq!(mode(&m, "bank", "vault", 80), (Permissive, "PeerAuthentication bank/ns".into()));
    }

    #[test]
    fn oldest_wins_at_one_level() {
        let m = model(&format!(
            "{}{}{}{}",
            pa(ROOT, "b-new", "2024-05-01T00:00:00Z", "  mtls: {mode: PERMISSIVE}\n"),
            pa(ROOT, "a-old", "2024-01-01T00:00:00Z", "  mtls: {mode: STRICT}\n"),
            pa(
                "shop",
                "web-new",
                "2024-06-01T00:00:00Z",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n"
            ),
            pa(
                "shop",
                "web-old",
                "2024-02-01T00:00:00Z",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}\n"
            ),
        ));
        assert_eq!(mode(&m, "shop", "api", 1), (Strict, "PeerAuthentication istio-system/a-old".into()));
        assert_eq!(mode(&m, "shop", "web", 1), (Disable, "PeerAuthentication shop/web-old".into()));
    }

    #[test]
    fn disable_means_no_tunnel_to_that_pod_and_port() {
        let tunnel = |m: &Model, ip: &str, port: u16| {
            crate::l4::tunnel_identity(m, ROOT, "cluster.local", format!("{ip}:{port}").parse().unwrap())
                .map(|id| id.to_string())
        };
        let m = model(&pa(
            "shop",
            "web",
            "2024-01-01T00:00:00Z",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}\n  portLevelMtls:\n    8443: {mode: STRICT}\n",
        ));
        assert_eq!(tunnel(&m, "10.0.0.1", 8080), None, "DISABLE: plaintext to the pod, as Istio's sidecars");
        assert_eq!(
            tunnel(&m, "10.0.0.1", 8443).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/default")
        );
        assert!(tunnel(&m, "10.0.0.2", 8080).is_some(), "other pods of the namespace still tunnel");
        // A mesh-wide DISABLE turns tunnelling off everywhere but where a lower level says otherwise.
        let m = model(&format!(
            "{}{}",
            pa(ROOT, "default", "2024-01-01T00:00:00Z", "  mtls: {mode: DISABLE}\n"),
            pa("bank", "ns", "2024-01-01T00:00:00Z", "  mtls: {mode: STRICT}\n"),
        ));
        assert_eq!(tunnel(&m, "10.0.0.1", 80), None);
        assert!(tunnel(&m, "10.0.0.3", 80).is_some());
    }

    #[test]
    fn selectors_only_reach_their_own_namespace() {
        // A root-namespace policy with a selector is a workload policy of the root namespace.
        let m = model(&pa(
            ROOT,
            "sel",
            "2024-01-01T00:00:00Z",
            "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n",
        ));
        assert_eq!(mode(&m, "shop", "web", 80).0, Permissive);
        let m = model(&pa(
            ROOT,
            "sel",
            "2024-01-01T00:00:00Z",
            "  selector: {matchLabels: {app: istiod}}\n  mtls: {mode: STRICT}\n",
        ));
        assert_eq!(mode(&m, "istio-system", "istiod", 80).0, Strict);
        // An empty selector is no selector.
        let m = model(&pa(
            "shop",
            "all",
            "2024-01-01T00:00:00Z",
            "  selector: {matchLabels: {}}\n  mtls: {mode: STRICT}\n",
        ));
        assert_eq!(mode(&m, "shop", "api", 80).0, Strict);
    }
}
