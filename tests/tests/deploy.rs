//! The Kubernetes manifests in `deploy/` (issue 7, acceptance 2): every manifest validates
//! against the Kubernetes schemas of a current release, CRDs included, and the example
//! resources validate against the CRDs' schemas. The validation itself is
//! `tests/deploy/validate.py` (kubernetes-validate and jsonschema from PyPI, which `cargo xtask
//! setup` installs); this suite runs it and fails with its output. The other tests pin down the
//! security-relevant choices of the DaemonSet and the RBAC rules, so that a later edit that
//! widens them fails here rather than in a review.
//!
//! No root, no cluster, no network: a few seconds.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_yaml::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Every `*.yaml`, `*.yml`, `*.json` under `dir`, recursively.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// All documents of one manifest file.
fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(de).with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn one_of_kind(path: &Path, kind: &str) -> Result<Value> {
    let docs = documents(path)?;
    let mut it = docs.into_iter().filter(|d| d["kind"] == kind);
    let doc = it.next().with_context(|| format!("no {kind} in {}", path.display()))?;
    ensure!(it.next().is_none(), "more than one {kind} in {}", path.display());
    Ok(doc)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Acceptance 2: kubernetes-validate (strict, the oldest supported and the newest shipped
/// Kubernetes release) for built-in kinds and CRDs, the CRDs' openAPIV3Schema for the custom
/// resources, plus cross-references between the manifests.
#[test]
fn every_manifest_validates_against_kubernetes_and_crd_schemas() -> Result<()> {
    let script = repo_root().join("tests/deploy/validate.py");
    let out =
        Command::new("python3").arg(&script).arg(deploy_dir()).current_dir(repo_root()).output().context(
            "running python3 (the deploy validation needs Python 3 with kubernetes-validate and jsonschema)",
        )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} failed ({}).\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\
             (its Python packages come from `python3 -m pip install kubernetes-validate==1.37.0 jsonschema`, \
             which `cargo xtask setup` runs)",
            script.display(),
            out.status
        );
    }
    print!("{stdout}");

    // The validator saw every manifest file there is, and checked every document.
    let files = manifest_files(&deploy_dir())?;
    let docs: usize = files.iter().map(|f| documents(f).map(|d| d.len())).sum::<Result<usize>>()?;
    let summary = format!("{docs} documents in {} files, 0 errors", files.len());
    ensure!(stdout.contains(&summary), "expected the validator to report {summary:?}:\n{stdout}");
    ensure!(
        stdout.lines().filter(|l| l.starts_with("checked ")).count() == docs,
        "every document must be reported as checked:\n{stdout}"
    );
    // The kinds this suite is about were validated by the right schemas (built-in kinds against
    // the oldest supported release, 1.30, and the newest one kubernetes-validate ships).
    for needle in [
        "DaemonSet/sluice): Kubernetes 1.30, 1.",
        "CustomResourceDefinition/trafficpolicies.sluice.dev): Kubernetes 1.30, 1.",
        "TrafficPolicy/reviews): CRD schema trafficpolicies.sluice.dev.yaml",
        "AuthorizationPolicy/ratings-from-reviews): CRD schema authorizationpolicies.security.istio.io.yaml",
        "HTTPRoute/reviews-canary): stand-in schema gateway-api-routes-subset.yaml",
    ] {
        ensure!(stdout.contains(needle), "expected {needle:?} in the validator's report:\n{stdout}");
    }
    Ok(())
}

/// The DaemonSet runs sluice unprivileged with exactly the capabilities it needs, on every node,
/// with the host namespaces and mounts sluice's kernel work requires.
#[test]
fn daemonset_is_least_privilege_and_runs_everywhere() -> Result<()> {
    let ds = one_of_kind(&deploy_dir().join("daemonset.yaml"), "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().context("containers")?;
    ensure!(containers.len() == 1, "one container");
    let c = &containers[0];
    let sc = &c["securityContext"];

    ensure!(sc["privileged"] != Value::Bool(true), "sluice's container must not be privileged");
    ensure!(
        strings(&sc["capabilities"]["drop"]) == ["ALL"],
        "drop ALL capabilities: {:?}",
        sc["capabilities"]
    );
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let expected: BTreeSet<String> =
        ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_PTRACE"].map(String::from).into_iter().collect();
    ensure!(added == expected, "capabilities {added:?}, expected exactly {expected:?}");
    ensure!(sc["readOnlyRootFilesystem"] == Value::Bool(true), "read-only root filesystem");

    // The only privileged container is the one-line bpffs mount (Bidirectional propagation
    // demands privileged), and it does nothing else.
    for init in pod["initContainers"].as_sequence().into_iter().flatten() {
        if init["securityContext"]["privileged"] == Value::Bool(true) {
            ensure!(init["name"] == "mount-bpffs", "unexpected privileged init container {:?}", init["name"]);
            let cmd = strings(&init["command"]).join(" ");
            ensure!(cmd.contains("mount -t bpf bpf /sys/fs/bpf"), "mount-bpffs runs {cmd:?}");
        }
    }

    ensure!(pod["hostPID"] == Value::Bool(true), "hostPID: pods' /proc/<pid>/ns/net");
    ensure!(pod["hostNetwork"] == Value::Bool(true), "hostNetwork: node-local admin API");
    ensure!(pod["priorityClassName"] == "system-node-critical", "priority class");
    let tolerations = pod["tolerations"].as_sequence().context("tolerations")?;
    ensure!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()),
        "a toleration that tolerates every taint: {tolerations:?}"
    );
    ensure!(
        pod["terminationGracePeriodSeconds"].as_u64().is_some_and(|s| s >= 30),
        "a grace period for draining"
    );
    // Upgrades without loss: the new pod starts beside the old one on each node.
    let strategy = &ds["spec"]["updateStrategy"];
    ensure!(
        strategy["type"] == "RollingUpdate"
            && strategy["rollingUpdate"]["maxSurge"] == 1
            && strategy["rollingUpdate"]["maxUnavailable"] == 0,
        "{strategy:?}"
    );
    // ... which declared ports would forbid (a host-network pod's ports become hostPorts).
    ensure!(c.get("ports").is_none(), "no container ports on a host-network pod that surges");

    // Requests and limits on every container.
    for c in containers.iter().chain(pod["initContainers"].as_sequence().into_iter().flatten()) {
        for k in ["requests", "limits"] {
            ensure!(c["resources"][k]["memory"].is_string(), "{:?}: resources.{k}.memory", c["name"]);
        }
    }

    // Readiness: HTTP on the node's port 15021, which sluice serves (--readiness-addr) and
    // hands over to the newest process during an upgrade.
    let ready = &c["readinessProbe"]["httpGet"];
    ensure!(
        ready["path"] == "/healthz/ready" && ready["port"] == 15021,
        "readiness is GET /healthz/ready on port 15021: {:?}",
        c["readinessProbe"]
    );
    ensure!(
        strings(&c["args"]).iter().any(|a| a == "--readiness-addr=0.0.0.0:15021"),
        "sluice must serve readiness where the probe asks: {:?}",
        c["args"]
    );
    // Metrics: Prometheus scrapes port 15020 of the node, named by annotations (a declared
    // port would be a hostPort, see above); sluice serves there (--metrics-addr).
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        annotations["prometheus.io/scrape"] == "true"
            && annotations["prometheus.io/port"] == "15020"
            && annotations["prometheus.io/path"] == "/metrics",
        "prometheus.io annotations for :15020/metrics: {annotations:?}"
    );
    ensure!(
        strings(&c["args"]).iter().any(|a| a == "--metrics-addr=0.0.0.0:15020"),
        "sluice must serve metrics where the annotations say: {:?}",
        c["args"]
    );
    // minReadySeconds must span at least one probe after the first success (see the DaemonSet).
    let period = c["readinessProbe"]["periodSeconds"].as_u64().unwrap_or(10);
    ensure!(
        ds["spec"]["minReadySeconds"].as_u64().is_some_and(|m| m > period)
            && c["readinessProbe"]["failureThreshold"] == 1,
        "minReadySeconds > readiness periodSeconds, failureThreshold 1"
    );
    // Liveness through the admin socket: sluice answers at all (15021 closes while draining).
    let live = strings(&c["livenessProbe"]["exec"]["command"]).join(" ");
    ensure!(live.contains("sluice status --node \"$NODE_NAME\""), "liveness: {live}");

    // The command line and the mounts it relies on.
    let args = strings(&c["args"]);
    for want in [
        "run",
        "--node=$(NODE_NAME)",
        "--source=kubernetes",
        "--cgroup-root=/host/sys/fs/cgroup",
        "--ca-dir=/etc/sluice/ca",
        "--bpffs=/sys/fs/bpf",
    ] {
        ensure!(args.iter().any(|a| a == want), "sluice run needs {want}: {args:?}");
    }
    let env = c["env"].as_sequence().context("env")?;
    let node = env.iter().find(|e| e["name"] == "NODE_NAME").context("NODE_NAME env")?;
    ensure!(node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", "{node:?}");
    ensure!(env.iter().any(|e| e["name"] == "SLUICE_LOG"), "SLUICE_LOG from the ConfigMap");

    let mounts = c["volumeMounts"].as_sequence().context("volumeMounts")?;
    let volumes = pod["volumes"].as_sequence().context("volumes")?;
    let host_path = |mount_path: &str| -> Option<(String, Option<String>)> {
        let m = mounts.iter().find(|m| m["mountPath"] == mount_path)?;
        let v = volumes.iter().find(|v| v["name"] == m["name"])?;
        let src = v["hostPath"]["path"].as_str().or_else(|| v["secret"]["secretName"].as_str())?;
        Some((src.to_owned(), m["mountPropagation"].as_str().map(str::to_owned)))
    };
    ensure!(
        host_path("/host/sys/fs/cgroup").is_some_and(|(p, _)| p == "/sys/fs/cgroup"),
        "host cgroup2 mount"
    );
    ensure!(
        host_path("/sys/fs/bpf") == Some(("/sys/fs/bpf".into(), Some("HostToContainer".into()))),
        "host bpffs with HostToContainer propagation"
    );
    ensure!(
        host_path("/run/sluice").is_some_and(|(p, _)| p == "/run/sluice"),
        "admin socket dir on the host"
    );
    ensure!(host_path("/etc/sluice/ca").is_some_and(|(s, _)| s == "sluice-ca"), "mesh root from the Secret");
    Ok(())
}

/// The Grafana dashboard (a ConfigMap for Grafana's dashboard sidecar) is valid dashboard JSON
/// whose data source is a variable, and its queries use only metrics sluice serves.
#[test]
fn dashboard_queries_metrics_sluice_serves() -> Result<()> {
    let cm = one_of_kind(&deploy_dir().join("dashboards/sluice.yaml"), "ConfigMap")?;
    ensure!(cm["metadata"]["labels"]["grafana_dashboard"] == "1", "label for Grafana's sidecar");
    let text = cm["data"]["sluice.json"].as_str().context("data.sluice.json")?;
    let dash: serde_json::Value = serde_json::from_str(text).context("the dashboard is not JSON")?;
    let vars = dash["templating"]["list"].as_array().context("templating.list")?;
    ensure!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable: {vars:?}"
    );
    // What sluice serves on :15020 (telemetry/metrics.rs, admin/metrics_server.rs).
    let mut served: BTreeSet<String> = BTreeSet::new();
    for c in ["istio_requests_total", "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"] {
        served.insert(c.into());
    }
    for c in ["istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"] {
        served.insert(c.into());
    }
    for h in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"] {
        for suffix in ["_bucket", "_count", "_sum"] {
            served.insert(format!("{h}{suffix}"));
        }
    }
    for m in [
        "sluice_kernel_events_total",
        "sluice_enrolled_pods",
        "sluice_bpf_map_entries",
        "sluice_bpf_map_capacity",
        "sluice_certificate_expiry_timestamp_seconds",
        "sluice_upstream_connections",
        "sluice_access_log_dropped_total",
        "sluice_http_local_replies_total",
        "sluice_http_retries_total",
        "sluice_http_overflow_total",
        "sluice_http_rate_limited_total",
        "sluice_egress_refused_total",
        "sluice_policy_denied_total",
        "sluice_connections_open",
        "sluice_ready",
    ] {
        served.insert(m.into());
    }
    let mut exprs: Vec<String> = Vec::new();
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            ensure!(t["datasource"]["uid"] == "${datasource}", "panel {:?} must use the data source variable", p["title"]);
            exprs.push(t["expr"].as_str().context("expr")?.to_string());
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        exprs.push(v["definition"].as_str().unwrap_or_default().to_string());
    }
    ensure!(exprs.len() >= 20, "expected the dashboard's queries, found {}", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        let b = e.as_bytes();
        for (i, _) in e.match_indices(['i', 's']) {
            let rest = &e[i..];
            if !(rest.starts_with("istio_") || rest.starts_with("sluice_")) {
                continue;
            }
            if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
                continue;
            }
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            used.insert(name);
        }
    }
    let unknown: Vec<&String> = used.iter().filter(|m| !served.contains(*m)).collect();
    ensure!(unknown.is_empty(), "the dashboard queries metrics sluice does not serve: {unknown:?}");
    for want in ["istio_requests_total", "istio_request_duration_milliseconds_bucket", "istio_tcp_sent_bytes_total", "sluice_kernel_events_total", "sluice_certificate_expiry_timestamp_seconds"] {
        ensure!(used.contains(want), "the dashboard should chart {want}");
    }
    Ok(())
}

/// sluice only reads the API: get/list/watch on what it watches, nothing else.
#[test]
fn rbac_only_reads_what_sluice_watches() -> Result<()> {
    let role = one_of_kind(&deploy_dir().join("rbac.yaml"), "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().context("rules")? {
        let verbs: BTreeSet<String> = strings(&rule["verbs"]).into_iter().collect();
        ensure!(
            verbs == ["get", "list", "watch"].map(String::from).into_iter().collect(),
            "verbs {verbs:?} in {rule:?}"
        );
        ensure!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(), "{rule:?}");
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                ensure!(!g.contains('*') && !r.contains('*'), "no wildcards: {g}/{r}");
                granted.insert(format!("{g}/{r}"));
            }
        }
    }
    let expected: BTreeSet<String> = [
        "/namespaces",
        "/pods",
        "/services",
        "discovery.k8s.io/endpointslices",
        "security.istio.io/authorizationpolicies",
        "gateway.networking.k8s.io/httproutes",
        "gateway.networking.k8s.io/grpcroutes",
        "networking.istio.io/serviceentries",
        "sluice.dev/trafficpolicies",
    ]
    .map(String::from)
    .into_iter()
    .collect();
    ensure!(granted == expected, "granted {granted:?}, expected exactly {expected:?}");

    // Every sluice.dev CRD shipped is readable by sluice.
    for f in manifest_files(&deploy_dir().join("crds"))? {
        for crd in documents(&f)? {
            let g = crd["spec"]["group"].as_str().unwrap_or_default();
            let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
            ensure!(
                granted.contains(&format!("{g}/{plural}")),
                "{}: {g}/{plural} is not granted",
                f.display()
            );
        }
    }
    Ok(())
}
