//! What Istio's telemetry labels say about a pod: its workload (named after the pod's
//! controller), app, version, canonical service and revision, derived from the pod's owner
//! reference, labels and `generateName` the way Istio derives them.
//!
//! The workload name is never the pod's own name: metric series are keyed by it, and pod
//! names change with every pod a Job, a StatefulSet scale-up or a restart creates, so naming
//! series after pods would grow them without bound. The pod name stays in [`WorkloadInfo::pod`]
//! for access logs, tap and `sluice stat`, which are not series.

use std::sync::Arc;

use super::model::{Labels, OwnerRef, Pod};

/// What a pod's workload is called when nothing names it (a bare pod without an app label or
/// a generated name).
pub const UNKNOWN_WORKLOAD: &str = "unknown";

/// A pod as telemetry labels describe it. Built once per pod per model snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub namespace: Arc<str>,
    /// The pod's workload, see [`workload_name`].
    pub workload: Arc<str>,
    pub pod: Arc<str>,
    /// `app.kubernetes.io/name`, else `app`, else "unknown".
    pub app: Arc<str>,
    /// `app.kubernetes.io/version`, else `version`, else "unknown".
    pub version: Arc<str>,
    /// `service.istio.io/canonical-name`, else the app label, else the workload.
    pub canonical_service: Arc<str>,
    /// `service.istio.io/canonical-revision`, else the version label, else "latest".
    pub canonical_revision: Arc<str>,
    pub service_account: Arc<str>,
}

impl WorkloadInfo {
    pub fn of(pod: &Pod) -> WorkloadInfo {
        let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k)).cloned();
        let workload = workload_name(pod);
        let app = app_label(&pod.labels).map(str::to_owned);
        let version = label(&["app.kubernetes.io/version", "version"]);
        WorkloadInfo {
            namespace: pod.namespace.as_str().into(),
            pod: pod.name.as_str().into(),
            canonical_service: label(&["service.istio.io/canonical-name"])
                .or_else(|| app.clone())
                .unwrap_or_else(|| workload.clone())
                .into(),
            canonical_revision: label(&["service.istio.io/canonical-revision"])
                .or_else(|| version.clone())
                .unwrap_or_else(|| "latest".into())
                .into(),
            app: app.unwrap_or_else(|| "unknown".into()).into(),
            version: version.unwrap_or_else(|| "unknown".into()).into(),
            workload: workload.into(),
            service_account: pod.service_account.as_str().into(),
        }
    }
}

/// The name of the workload a pod belongs to:
///
/// - with a controller (`ownerReferences[].controller: true`), the controller's name, except
///   that a ReplicaSet whose name ends in `-<pod-template-hash>` (the pod's label) is its
///   Deployment's (`rollouts-pod-template-hash`: an Argo Rollout's), a ReplicationController
///   of an OpenShift DeploymentConfig (label `deploymentconfig`) is that DeploymentConfig, and
///   a Job named `<name>-<8 to 10 digits>` (the scheduled time a CronJob appends) is the
///   CronJob `<name>`: Istio's heuristics, as its `GetDeployMetaFromPod` applies them;
/// - without one (a bare pod): its app label (`app.kubernetes.io/name`, else `app`), else its
///   `generateName` without the trailing `-`, else [`UNKNOWN_WORKLOAD`]. Never the pod name,
///   which may be generated and unique to the pod.
pub fn workload_name(pod: &Pod) -> String {
    match &pod.controller {
        Some(owner) => controller_workload(owner, &pod.labels).to_owned(),
        None => app_label(&pod.labels)
            .or_else(|| {
                pod.generate_name.as_deref().map(|g| g.trim_end_matches('-')).filter(|g| !g.is_empty())
            })
            .unwrap_or(UNKNOWN_WORKLOAD)
            .to_owned(),
    }
}

/// The workload a controller stands for (see [`workload_name`]).
fn controller_workload<'a>(owner: &'a OwnerRef, labels: &'a Labels) -> &'a str {
    let label = |key: &str| labels.get(key).map(String::as_str).filter(|v| !v.is_empty());
    match owner.kind.as_str() {
        "ReplicaSet" => ["pod-template-hash", "rollouts-pod-template-hash"]
            .into_iter()
            .find_map(|key| strip_hash(&owner.name, label(key)?))
            .unwrap_or(&owner.name),
        "ReplicationController" => label("deploymentconfig").unwrap_or(&owner.name),
        "Job" => cronjob_of(&owner.name).unwrap_or(&owner.name),
        _ => &owner.name,
    }
}

/// `reviews-v1-5d8f7c9b4` with hash `5d8f7c9b4` → `reviews-v1`.
fn strip_hash<'a>(replica_set: &'a str, hash: &str) -> Option<&'a str> {
    replica_set.strip_suffix(hash)?.strip_suffix('-').filter(|d| !d.is_empty())
}

/// `nightly-backup-28901234` → `nightly-backup`: the CronJob controller names each Job after
/// its CronJob and its scheduled time in minutes since the epoch. Istio's pattern
/// `(.+)-\d{8,10}$`.
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !cronjob.is_empty()).then_some(cronjob)
}

/// `app.kubernetes.io/name`, else `app` (empty values count as absent).
fn app_label(labels: &Labels) -> Option<&str> {
    ["app.kubernetes.io/name", "app"]
        .into_iter()
        .find_map(|k| labels.get(k).map(String::as_str).filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::manifest::{parse, Format};
    use crate::discovery::{Object, PodPhase};

    fn pod(name: &str, labels: &[(&str, &str)], owner: Option<(&str, &str)>, generate: Option<&str>) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: Default::default(),
            service_account: "default".into(),
            node_name: Some("n1".into()),
            ip: "10.244.1.10".parse().unwrap(),
            ips: vec!["10.244.1.10".parse().unwrap()],
            host_network: false,
            phase: PodPhase::Running,
            controller: owner.map(|(kind, name)| OwnerRef { kind: kind.into(), name: name.into() }),
            generate_name: generate.map(str::to_owned),
        }
    }

    fn workload(
        name: &str,
        labels: &[(&str, &str)],
        owner: Option<(&str, &str)>,
        generate: Option<&str>,
    ) -> String {
        workload_name(&pod(name, labels, owner, generate))
    }

    #[test]
    fn deployment_pods_are_named_after_their_deployment() {
        let hash = [("pod-template-hash", "5d8f7c9b4")];
        let rs = Some(("ReplicaSet", "reviews-v1-5d8f7c9b4"));
        assert_eq!(
            workload("reviews-v1-5d8f7c9b4-x2x9k", &hash, rs, Some("reviews-v1-5d8f7c9b4-")),
            "reviews-v1"
        );
        // An Argo Rollout's ReplicaSet.
        let rollout = [("rollouts-pod-template-hash", "6b7c8d")];
        assert_eq!(
            workload("canary-6b7c8d-abcde", &rollout, Some(("ReplicaSet", "canary-6b7c8d")), None),
            "canary"
        );
    }

    #[test]
    fn a_replica_set_not_of_that_form_is_its_own_workload() {
        // No pod-template-hash: a ReplicaSet created by hand.
        assert_eq!(workload("cache-7xk2p", &[], Some(("ReplicaSet", "cache")), Some("cache-")), "cache");
        // A hash the ReplicaSet's name does not end with.
        let hash = [("pod-template-hash", "zzz")];
        assert_eq!(workload("odd-abcde", &hash, Some(("ReplicaSet", "odd-name")), None), "odd-name");
        // A ReplicaSet named only by the hash keeps its name (no empty workload).
        let hash = [("pod-template-hash", "abc")];
        assert_eq!(workload("abc-x", &hash, Some(("ReplicaSet", "-abc")), None), "-abc");
    }

    #[test]
    fn stateful_and_daemon_sets_and_replication_controllers_name_their_pods() {
        let sts = Some(("StatefulSet", "db"));
        assert_eq!(workload("db-0", &[("app", "postgres")], sts, None), "db");
        assert_eq!(workload("db-17", &[], sts, None), "db");
        let ds = Some(("DaemonSet", "node-exporter"));
        assert_eq!(
            workload("node-exporter-k2x8q", &[("controller-revision-hash", "7f")], ds, None),
            "node-exporter"
        );
        assert_eq!(workload("legacy-x2x9k", &[], Some(("ReplicationController", "legacy")), None), "legacy");
        // OpenShift: the DeploymentConfig's ReplicationController `<dc>-<n>`.
        let dc = [("deploymentconfig", "frontend")];
        assert_eq!(
            workload("frontend-3-abcde", &dc, Some(("ReplicationController", "frontend-3")), None),
            "frontend"
        );
    }

    #[test]
    fn jobs_and_cron_jobs() {
        assert_eq!(workload("migrate-x7k2p", &[], Some(("Job", "migrate")), Some("migrate-")), "migrate");
        let cron = Some(("Job", "nightly-backup-28901234"));
        assert_eq!(workload("nightly-backup-28901234-q8w2e", &[], cron, None), "nightly-backup");
        assert_eq!(workload("r-1234567890-x", &[], Some(("Job", "r-1234567890")), None), "r");
        // Not a scheduled time: too few or too many digits, or not only digits.
        for job in ["build-1234567", "build-12345678901", "build-1234567a", "-12345678", "12345678"] {
            assert_eq!(workload("p", &[], Some(("Job", job)), None), job);
        }
    }

    #[test]
    fn other_controllers_are_named_as_they_are() {
        let crd = Some(("Rollout", "checkout"));
        assert_eq!(workload("checkout-5c9d-abcde", &[], crd, None), "checkout");
        let op = Some(("CassandraDatacenter", "dc1"));
        assert_eq!(workload("dc1-rack1-sts-0", &[("app", "cassandra")], op, None), "dc1");
    }

    #[test]
    fn bare_pods_are_never_named_after_themselves() {
        // The app label first (the recommended one before the legacy one).
        let labels = [("app", "legacy"), ("app.kubernetes.io/name", "debugger")];
        assert_eq!(workload("debugger-9f8e7", &labels, None, Some("debugger-")), "debugger");
        assert_eq!(workload("toolbox", &[("app", "toolbox")], None, None), "toolbox");
        // Else the generated name's prefix.
        assert_eq!(workload("runner-x7k2p", &[], None, Some("runner-")), "runner");
        assert_eq!(workload("runner-x7k2p", &[("app", "")], None, Some("runner-")), "runner");
        // Else nothing names it.
        assert_eq!(workload("tmp-31337", &[], None, None), UNKNOWN_WORKLOAD);
        assert_eq!(workload("tmp-31337", &[], None, Some("-")), UNKNOWN_WORKLOAD);
        // A pod-template-hash label without an owner does not bring back the pod name.
        assert_eq!(
            workload("web-5d8f7c9b4-x2x9k", &[("pod-template-hash", "5d8f7c9b4")], None, None),
            UNKNOWN_WORKLOAD
        );
    }

    #[test]
    fn the_canonical_service_follows_the_workload_without_an_app_label() {
        let w = WorkloadInfo::of(&pod("db-0", &[], Some(("StatefulSet", "db")), None));
        assert_eq!((&*w.workload, &*w.canonical_service, &*w.app, &*w.pod), ("db", "db", "unknown", "db-0"));
    }

    /// The owner and generated name as the API server writes them, through the parser both
    /// discovery sources share.
    #[test]
    fn owner_references_are_read_from_the_manifest() {
        let yaml = |meta: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: db-1\n  namespace: shop\n  uid: u1\n{meta}status:\n  podIP: 10.0.0.5\n"
            )
        };
        let parsed = |meta: &str| -> Result<Pod, String> {
            let mut objects = parse(&yaml(meta), Format::Yaml).map_err(|e| e.to_string())?;
            match objects.remove(0) {
                Object::Pod(p) => Ok((*p).clone()),
                other => panic!("{other:?}"),
            }
        };
        let p = parsed(
            "  generateName: db-\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: not-the-controller\n    uid: a\n  - apiVersion: apps/v1\n    blockOwnerDeletion: true\n    controller: true\n    kind: StatefulSet\n    name: db\n    uid: b\n",
        )
        .unwrap();
        assert_eq!(p.controller, Some(OwnerRef { kind: "StatefulSet".into(), name: "db".into() }));
        assert_eq!(p.generate_name.as_deref(), Some("db-"));
        assert_eq!(WorkloadInfo::of(&p).workload.as_ref(), "db");
        // Owners that are not the controller do not name the workload.
        let p =
            parsed("  ownerReferences:\n  - kind: ConfigMap\n    name: cm\n    controller: false\n").unwrap();
        assert_eq!((p.controller, p.generate_name), (None, None));
        // Malformed references are reported with their path.
        let e = parsed("  ownerReferences:\n  - kind: StatefulSet\n    controller: true\n").unwrap_err();
        assert!(e.ends_with("missing required field `metadata.ownerReferences[0].name`"), "{e}");
        let e = parsed("  ownerReferences:\n  - kind: \"\"\n    name: db\n").unwrap_err();
        assert!(e.ends_with("metadata.ownerReferences[0].kind: must not be empty"), "{e}");
        let e = parsed("  ownerReferences: db\n").unwrap_err();
        assert!(e.ends_with("metadata.ownerReferences: invalid type: string \"db\", expected a sequence"), "{e}");
    }
}
