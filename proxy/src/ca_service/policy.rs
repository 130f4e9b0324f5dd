//! The decision: may this caller have a certificate for this identity?
//!
//! Two steps, with the rate limit between them (it is keyed by the caller's node, which the
//! first step finds):
//!
//! 1. [`identify_caller`]: the reviewed token is for the CA's audience, belongs to the node
//!    agents' ServiceAccount, and is bound to a pod the CA's own pod watch knows (same UID):
//!    a running host-network pod controlled by a DaemonSet, as the node agent's is. The
//!    caller's node is that pod's node; a node claim in the token, when there is one, must
//!    name the same node.
//! 2. [`authorize`]: the identity is in the CA's trust domain, and a pod of that namespace and
//!    ServiceAccount is scheduled on the caller's node and has not finished.
//!
//! The caller's node always comes from the token (signed by the API server) and the CA's own
//! view of the pod it is bound to, never from the request: a node can only obtain identities
//! of the pods the scheduler placed on it. Requiring the bound pod to be the DaemonSet's
//! (host network, DaemonSet controller) means that creating a pod with the node agents'
//! ServiceAccount and a `nodeName` of one's choosing, or minting a token bound to a Node
//! object, is not enough to act as a node: it takes changing the DaemonSet itself.

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
    let unknown = |why: String| Err(Refusal::CallerNodeUnknown(why));
    let Some(pod_name) = reviewed.claim(POD_NAME_EXTRA) else {
        return unknown(
            "the token is not bound to a pod; the node agent must present the projected ServiceAccount token \
             of its own pod (serviceAccountToken volume), not a token bound to a node or to nothing"
                .into(),
        );
    };
    let Some(pod) = pods.pod(ns, pod_name) else {
        return unknown(format!(
            "the token is bound to pod {ns}/{pod_name}, which the CA's pod watch does not know (gone, or not \
             seen yet)"
        ));
    };
    match reviewed.claim(POD_UID_EXTRA) {
        Some(uid) if pod.uid.is_empty() || pod.uid == uid => {}
        Some(uid) => {
            return unknown(format!(
                "the token is bound to pod {ns}/{pod_name} with uid {uid}, but that pod is now uid {}",
                pod.uid
            ))
        }
        None => return unknown(format!("the token names pod {ns}/{pod_name} but not its uid")),
    }
    if !pod.host_network || !pod.daemonset_owned {
        return unknown(format!(
            "the token's pod {ns}/{pod_name} is not a node agent's: node agents run as a DaemonSet's \
             host-network pods (hostNetwork {}, controlled by a DaemonSet {})",
            pod.host_network, pod.daemonset_owned
        ));
    }
    let node = match (&pod.node, pod.finished) {
        (Some(node), false) => node,
        (None, _) => return unknown(format!("the token's pod {ns}/{pod_name} is not scheduled on any node")),
        (Some(_), true) => return unknown(format!("the token's pod {ns}/{pod_name} has finished")),
    };
    if let Some(claimed) = reviewed.claim(NODE_NAME_EXTRA) {
        if claimed != node {
            return unknown(format!(
                "the token names node {claimed:?}, but its pod {ns}/{pod_name} runs on node {node:?}"
            ));
        }
    }
    Ok(Caller { node: node.clone(), service_account, pod: Some(pod_name.to_string()) })
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
    use super::super::pods::{test_agent_pod as agent_pod, test_pod as pod};
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
            agent_pod("sluice-system", "sluice-a", "n1"),
            agent_pod("sluice-system", "sluice-b", "n2"),
            // A pod anyone allowed to create pods in sluice-system could make, naming the node
            // agents' ServiceAccount and the node of their choice.
            pod("sluice-system", "rogue", "sluice", Some("n2"), "Running"),
        ])
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa)
    }

    /// n1's node agent, as the kubelet projects its token on Kubernetes 1.32+.
    fn n1() -> Reviewed {
        node_agent(Some("n1"), Some("sluice-a"))
    }

    fn decide(reviewed: &Reviewed, identity: &SpiffeId) -> Result<Caller, Refusal> {
        let pods = cluster();
        let caller = identify_caller(reviewed, &config(), &pods)?;
        authorize(&caller, identity, &config(), &pods)?;
        Ok(caller)
    }

    fn unknown_node(r: Result<Caller, Refusal>, says: &str) {
        match r {
            Err(Refusal::CallerNodeUnknown(why)) => {
                assert!(why.contains(says), "{why:?} should say {says:?}")
            }
            other => panic!("expected caller_node_unknown saying {says:?}, got {other:?}"),
        }
    }

    #[test]
    fn a_node_gets_the_identities_of_its_pods() {
        let caller = decide(&n1(), &id("web")).expect("web runs on n1");
        assert_eq!(caller.node, "n1");
        assert_eq!(caller.service_account, "sluice-system/sluice");
        decide(&n1(), &id("batch")).expect("a pending pod counts");
        decide(&node_agent(Some("n2"), Some("sluice-b")), &id("db")).expect("db runs on n2");
    }

    #[test]
    fn an_impostor_node_is_refused() {
        // n1's token asking for n2's pod identity.
        let err = decide(&n1(), &id("db")).unwrap_err();
        assert!(matches!(err, Refusal::NoPodOnNode { ref node, .. } if node == "n1"), "{err:?}");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_node_comes_from_the_bound_pod() {
        let caller = decide(&node_agent(None, Some("sluice-b")), &id("db")).expect("sluice-b runs on n2");
        assert_eq!(caller.node, "n2");
        assert!(matches!(
            decide(&node_agent(None, Some("sluice-b")), &id("web")),
            Err(Refusal::NoPodOnNode { .. })
        ));
        unknown_node(decide(&node_agent(None, Some("sluice-gone")), &id("db")), "does not know");
        let mut recreated = node_agent(None, Some("sluice-b"));
        recreated.extra.insert(POD_UID_EXTRA.into(), vec!["another-uid".into()]);
        unknown_node(decide(&recreated, &id("db")), "is now uid");
        let unbound = decide(&node_agent(None, None), &id("db")).unwrap_err();
        assert!(matches!(unbound, Refusal::CallerNodeUnknown(_)));
        assert_eq!(unbound.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_token_bound_to_a_node_only_is_refused() {
        // A token bound to a Node object (TokenRequest with boundObjectRef kind Node) names a
        // node but no pod: it proves no DaemonSet pod, so it is not a node agent's.
        unknown_node(decide(&node_agent(Some("n1"), None), &id("web")), "not bound to a pod");
    }

    #[test]
    fn the_node_claim_must_agree_with_the_bound_pod() {
        unknown_node(decide(&node_agent(Some("n2"), Some("sluice-a")), &id("db")), "runs on node \"n1\"");
    }

    #[test]
    fn a_pod_of_the_node_service_account_that_is_not_the_daemonsets_is_refused() {
        // Finding: creating a pod with the node agents' ServiceAccount and a nodeName of one's
        // choice gave its token that node's identities.
        unknown_node(decide(&node_agent(Some("n2"), Some("rogue")), &id("db")), "not a node agent's");
    }

    #[test]
    fn a_finished_or_unscheduled_bound_pod_names_no_node() {
        // Finding 13: the node-claim path did not check that the bound pod has not finished.
        let mut pods = cluster();
        let mut done = agent_pod("sluice-system", "sluice-a", "n1");
        done.finished = true;
        pods.apply(done);
        unknown_node(identify_caller(&n1(), &config(), &pods), "has finished");
        let mut pending = agent_pod("sluice-system", "sluice-a", "n1");
        pending.node = None;
        pods.apply(pending);
        unknown_node(identify_caller(&node_agent(None, Some("sluice-a")), &config(), &pods), "not scheduled");
    }

    #[test]
    fn another_service_account_is_refused() {
        let mut other = n1();
        other.username = "system:serviceaccount:shop:web".into();
        let err = decide(&other, &id("web")).unwrap_err();
        assert!(matches!(err, Refusal::NotNodeAccount { .. }), "{err:?}");
        assert!(err.to_string().contains("shop/web"), "{err}");
        let mut user = n1();
        user.username = "kubernetes-admin".into();
        assert!(matches!(decide(&user, &id("web")), Err(Refusal::NotNodeAccount { .. })));
    }

    #[test]
    fn another_audience_is_refused() {
        let mut other = n1();
        other.audiences = vec!["https://kubernetes.default.svc".into()];
        let err = decide(&other, &id("web")).unwrap_err();
        assert!(matches!(err, Refusal::WrongAudience { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        other.audiences.clear();
        assert!(matches!(decide(&other, &id("web")), Err(Refusal::WrongAudience { .. })));
    }

    #[test]
    fn identities_without_a_running_pod_are_refused() {
        let nowhere = decide(&n1(), &id("ghost")).unwrap_err();
        assert!(matches!(nowhere, Refusal::NoPodAnywhere { .. }), "{nowhere:?}");
        assert!(
            matches!(decide(&n1(), &id("migrate")), Err(Refusal::NoPodAnywhere { .. })),
            "finished pods hold nothing"
        );
        let elsewhere = SpiffeId::new("other.domain", "shop", "web");
        assert!(matches!(decide(&n1(), &elsewhere), Err(Refusal::WrongTrustDomain { .. })));
        let agents = SpiffeId::new("cluster.local", "sluice-system", "sluice");
        // The node agents' own identity: n1 runs sluice-a, but a host-network DaemonSet pod
        // gives its node nothing (only the ordinary "rogue" pod on n2 holds it, for n2).
        assert!(
            matches!(decide(&n1(), &agents), Err(Refusal::NoPodOnNode { .. })),
            "the node agents' own identity is not n1's to ask for"
        );
    }
}
