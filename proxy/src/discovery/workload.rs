//! What Istio's telemetry labels say about a pod: its workload (the owning controller's name),
//! app, version, canonical service and revision, derived from the pod's labels and name the
//! way Istio derives them.

use std::sync::Arc;

use super::model::Pod;

/// A pod as telemetry labels describe it. Built once per pod per model snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub namespace: Arc<str>,
    /// The owning Deployment (the pod name without its ReplicaSet and pod suffixes when the pod
    /// carries `pod-template-hash`), else the pod's name.
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
        let workload = workload_name(&pod.name, pod.labels.get("pod-template-hash").map(String::as_str));
        let app = label(&["app.kubernetes.io/name", "app"]);
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

/// `reviews-v1-5d8f7c9b4-x2x9k` with `pod-template-hash=5d8f7c9b4` → `reviews-v1`.
fn workload_name(pod: &str, template_hash: Option<&str>) -> String {
    if let Some(hash) = template_hash {
        if let Some(i) = pod.rfind(&format!("-{hash}-")) {
            return pod[..i].to_owned();
        }
    }
    pod.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_pods_are_named_after_their_deployment() {
        assert_eq!(workload_name("reviews-v1-5d8f7c9b4-x2x9k", Some("5d8f7c9b4")), "reviews-v1");
        assert_eq!(workload_name("web-0", None), "web-0");
        assert_eq!(workload_name("odd-name", Some("zzz")), "odd-name");
    }
}
