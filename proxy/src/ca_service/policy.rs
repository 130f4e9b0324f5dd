//! The decision: may this caller have a certificate for this identity?
//!
//! Two steps, with the rate limit between them (it is keyed by the caller's node, which the
//! first step finds):
//!
//! 1. [`identify_caller`]: the reviewed token is for the CA's audience, belongs to the node
//!    agents' ServiceAccount, and names the caller's node: the node claim of a node-bound token,
//!    else the node of the pod the token is bound to, as the CA's own pod watch knows it.
//! 2. [`authorize`]: the identity is in the CA's trust domain, and a pod of that namespace and
//!    ServiceAccount is scheduled on the caller's node and has not finished.
//!
//! The caller's node always comes from the token (signed by the API server), never from the
//! request: a node can only obtain identities of the pods the scheduler placed on it.

use super::authn::{Reviewed, NODE_NAME_EXTRA, POD_NAME_EXTRA, POD_UID_EXTRA};
use super::pods::PodIndex;
use super::refusal::Refusal;
use crate::identity::SpiffeId;

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub trust_domain: String,
    /// `(namespace, name)` of the node agents' ServiceAccount (`--node-service-account`).
    pub node_service_account: (String, String),
    /// The token audience the CA accepts (`--audience`).
    pub audience: String,
}

/// An authenticated node agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    /// `namespace/name`, for logs.
    pub service_account: String,
    /// The pod the token is bound to, if it says.
    pub pod: Option<String>,
}

/// Step 1 (see the module documentation).
pub fn identify_caller(
    reviewed: &Reviewed,
    config: &PolicyConfig,
    pods: &PodIndex,
) -> Result<Caller, Refusal> {
    if !reviewed.audiences.contains(&config.audience) {
        return Err(Refusal::WrongAudience {
            audience: config.audience.clone(),
            got: reviewed.audiences.clone(),
        });
    }
    let (want_ns, want_name) = &config.node_service_account;
    let expected = format!("{want_ns}/{want_name}");
    let Some((ns, name)) = reviewed.service_account() else {
        return Err(Refusal::NotNodeAccount { user: format!("user {:?}", reviewed.username), expected });
    };
    if ns != want_ns || name != want_name {
        return Err(Refusal::NotNodeAccount { user: format!("ServiceAccount {ns}/{name}"), expected });
    }
    let service_account = expected;
    let pod_name = reviewed.claim(POD_NAME_EXTRA);
    if let Some(node) = reviewed.claim(NODE_NAME_EXTRA) {
        return Ok(Caller { node: node.to_string(), service_account, pod: pod_name.map(str::to_owned) });
    }
    let Some(pod_name) = pod_name else {
        return Err(Refusal::CallerNodeUnknown(
            "the token is bound to neither a node nor a pod; mount a projected ServiceAccount token \
             (serviceAccountToken volume) in the node agent's pod"
                .into(),
        ));
    };
    let Some(pod) = pods.pod(ns, pod_name) else {
        return Err(Refusal::CallerNodeUnknown(format!(
            "the token is bound to pod {ns}/{pod_name}, which the CA's pod watch does not know (gone, or not \
             seen yet)"
        )));
    };
    if let Some(uid) = reviewed.claim(POD_UID_EXTRA) {
        if !pod.uid.is_empty() && pod.uid != uid {
            return Err(Refusal::CallerNodeUnknown(format!(
                "the token is bound to pod {ns}/{pod_name} with uid {uid}, but that pod is now uid {}",
                pod.uid
            )));
        }
    }
    match (&pod.node, pod.finished) {
        (Some(node), false) => {
            Ok(Caller { node: node.clone(), service_account, pod: Some(pod_name.to_string()) })
        }
        (None, _) => Err(Refusal::CallerNodeUnknown(format!(
            "the token's pod {ns}/{pod_name} is not scheduled on any node"
        ))),
        (Some(_), true) => {
            Err(Refusal::CallerNodeUnknown(format!("the token's pod {ns}/{pod_name} has finished")))
        }
    }
}

/// Step 2 (see the module documentation).
pub fn authorize(
    caller: &Caller,
    identity: &SpiffeId,
    config: &PolicyConfig,
    pods: &PodIndex,
) -> Result<(), Refusal> {
    if identity.trust_domain != config.trust_domain {
        return Err(Refusal::WrongTrustDomain {
            identity: identity.to_string(),
            trust_domain: config.trust_domain.clone(),
            node: caller.node.clone(),
        });
    }
    let (ns, sa) = (identity.namespace.as_str(), identity.service_account.as_str());
    if pods.on_node(&caller.node, ns, sa) {
        return Ok(());
    }
    let (namespace, service_account, node) = (ns.to_string(), sa.to_string(), caller.node.clone());
    if pods.anywhere(ns, sa) {
        Err(Refusal::NoPodOnNode { namespace, service_account, node })
    } else {
        Err(Refusal::NoPodAnywhere { namespace, service_account, node })
    }
}

#[cfg(test)]
mod tests {
    use super::super::authn::tests::node_agent;
    use super::super::pods::test_pod as pod;
    use super::*;

    fn config() -> PolicyConfig {
        PolicyConfig {
            trust_domain: "cluster.local".into(),
            node_service_account: ("sluice-system".into(), "sluice".into()),
            audience: "sluice-ca".into(),
        }
    }

    fn cluster() -> PodIndex {
        PodIndex::from_pods([
            pod("shop", "web-1", "web", Some("n1"), "Running"),
            pod("shop", "db-1", "db", Some("n2"), "Running"),
            pod("shop", "migrate-1", "migrate", Some("n1"), "Succeeded"),
            pod("shop", "batch-1", "batch", Some("n1"), "Pending"),
            pod("sluice-system", "sluice-a", "sluice", Some("n1"), "Running"),
            pod("sluice-system", "sluice-b", "sluice", Some("n2"), "Running"),
        ])
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa)
    }

    fn decide(reviewed: &Reviewed, identity: &SpiffeId) -> Result<Caller, Refusal> {
        let pods = cluster();
        let caller = identify_caller(reviewed, &config(), &pods)?;
        authorize(&caller, identity, &config(), &pods)?;
        Ok(caller)
    }

    #[test]
    fn a_node_gets_the_identities_of_its_pods() {
        let caller = decide(&node_agent(Some("n1"), Some("sluice-a")), &id("web")).expect("web runs on n1");
        assert_eq!(caller.node, "n1");
        assert_eq!(caller.service_account, "sluice-system/sluice");
        decide(&node_agent(Some("n1"), None), &id("batch")).expect("a pending pod counts");
        decide(&node_agent(Some("n2"), None), &id("db")).expect("db runs on n2");
    }

    #[test]
    fn an_impostor_node_is_refused() {
        // n1's token asking for n2's pod identity.
        let err = decide(&node_agent(Some("n1"), None), &id("db")).unwrap_err();
        assert!(matches!(err, Refusal::NoPodOnNode { ref node, .. } if node == "n1"), "{err:?}");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_node_comes_from_the_bound_pod_when_there_is_no_node_claim() {
        let caller = decide(&node_agent(None, Some("sluice-b")), &id("db")).expect("sluice-b runs on n2");
        assert_eq!(caller.node, "n2");
        assert!(matches!(
            decide(&node_agent(None, Some("sluice-b")), &id("web")),
            Err(Refusal::NoPodOnNode { .. })
        ));
        let unknown = decide(&node_agent(None, Some("sluice-gone")), &id("db")).unwrap_err();
        assert!(matches!(unknown, Refusal::CallerNodeUnknown(_)), "{unknown:?}");
        let mut recreated = node_agent(None, Some("sluice-b"));
        recreated.extra.insert(POD_UID_EXTRA.into(), vec!["another-uid".into()]);
        assert!(matches!(decide(&recreated, &id("db")), Err(Refusal::CallerNodeUnknown(_))));
        let unbound = decide(&node_agent(None, None), &id("db")).unwrap_err();
        assert!(matches!(unbound, Refusal::CallerNodeUnknown(_)));
        assert_eq!(unbound.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn another_service_account_is_refused() {
        let mut other = node_agent(Some("n1"), None);
        other.username = "system:serviceaccount:shop:web".into();
        let err = decide(&other, &id("web")).unwrap_err();
        assert!(matches!(err, Refusal::NotNodeAccount { .. }), "{err:?}");
        assert!(err.to_string().contains("shop/web"), "{err}");
        let mut user = node_agent(Some("n1"), None);
        user.username = "kubernetes-admin".into();
        assert!(matches!(decide(&user, &id("web")), Err(Refusal::NotNodeAccount { .. })));
    }

    #[test]
    fn another_audience_is_refused() {
        let mut other = node_agent(Some("n1"), None);
        other.audiences = vec!["https://kubernetes.default.svc".into()];
        let err = decide(&other, &id("web")).unwrap_err();
        assert!(matches!(err, Refusal::WrongAudience { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        other.audiences.clear();
        assert!(matches!(decide(&other, &id("web")), Err(Refusal::WrongAudience { .. })));
    }

    #[test]
    fn identities_without_a_running_pod_are_refused() {
        let n1 = node_agent(Some("n1"), None);
        let nowhere = decide(&n1, &id("ghost")).unwrap_err();
        assert!(matches!(nowhere, Refusal::NoPodAnywhere { .. }), "{nowhere:?}");
        assert!(
            matches!(decide(&n1, &id("migrate")), Err(Refusal::NoPodAnywhere { .. })),
            "finished pods hold nothing"
        );
        let elsewhere = SpiffeId::new("other.domain", "shop", "web");
        assert!(matches!(decide(&n1, &elsewhere), Err(Refusal::WrongTrustDomain { .. })));
    }
}
