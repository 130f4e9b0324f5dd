//! The Kubernetes manifests in `deploy/` (issue 7, acceptance 2): every manifest validates
//! against the Kubernetes schemas of a current release, CRDs included, and the example
//! resources validate against the CRDs' schemas. The validation itself is
//! `tests/deploy/validate.py` (kubernetes-validate and jsonschema from PyPI, which `cargo xtask
//! setup` installs); this suite runs it and fails with its output. The other tests pin down the
//! security-relevant choices of the DaemonSet, the CA service and the RBAC rules (issue 13: no
//! node holds a signing key; only the CA Deployment mounts one), so that a later edit that
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
use serde_yaml_ng::Value;

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
    for de in serde_yaml_ng::Deserializer::from_str(&text) {
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
        "Deployment/sluice-ca): Kubernetes 1.30, 1.",
        "PodDisruptionBudget/sluice-ca): Kubernetes 1.30, 1.",
        "CustomResourceDefinition/trafficpolicies.sluice.dev): Kubernetes 1.30, 1.",
        "TrafficPolicy/reviews): CRD schema trafficpolicies.sluice.dev.yaml",
        "AuthorizationPolicy/ratings-from-reviews): CRD schema authorizationpolicies.security.istio.io.yaml",
        // Istio's kinds of the Bookinfo tasks, against the optional CRDs sluice ships for them.
        "VirtualService/reviews): CRD schema virtualservices.networking.istio.io.yaml",
        "DestinationRule/reviews): CRD schema destinationrules.networking.istio.io.yaml",
        "PeerAuthentication/default): CRD schema peerauthentications.security.istio.io.yaml",
        "RequestAuthentication/productpage-jwt): CRD schema requestauthentications.security.istio.io.yaml",
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
        "--ca-addr=https://sluice-ca.sluice-system.svc:15012",
        "--ca-trust-bundle=/etc/sluice/ca/bundle.pem",
        "--ca-token-file=/var/run/secrets/sluice-ca/token",
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
        "security.istio.io/peerauthentications",
        "security.istio.io/requestauthentications",
        "gateway.networking.k8s.io/httproutes",
        "gateway.networking.k8s.io/grpcroutes",
        "networking.istio.io/serviceentries",
        "networking.istio.io/virtualservices",
        "networking.istio.io/destinationrules",
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

/// A file mode as kubectl reads it: YAML 1.1, where `0400` is octal (serde_yaml_ng follows YAML 1.2
/// and leaves it a string); a plain integer is decimal, `0o400` octal.
fn file_mode(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => match s.strip_prefix("0o").or_else(|| s.strip_prefix('0')) {
            Some(oct) if !oct.is_empty() => u64::from_str_radix(oct, 8).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// `--flag=value` of a container's args.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_owned))
}

/// The volume a container mounts at the directory holding `file` (and whether read-only).
fn volume_for<'a>(pod: &'a Value, container: &Value, file: &str) -> Result<(&'a Value, bool)> {
    let dir = Path::new(file).parent().context("a file in a directory")?;
    let mount = container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(dir))
        .with_context(|| format!("no volume mounted at {}", dir.display()))?;
    let volume = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .with_context(|| format!("no volume {:?}", mount["name"]))?;
    Ok((volume, mount["readOnly"] == Value::Bool(true)))
}

/// Names of the Secrets a pod spec's volumes mount, directly or through a projected volume.
fn secrets_mounted(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for v in pod["volumes"].as_sequence().into_iter().flatten() {
        if let Some(name) = v["secret"]["secretName"].as_str() {
            out.push(name.to_owned());
        }
        for src in v["projected"]["sources"].as_sequence().into_iter().flatten() {
            if let Some(name) = src["secret"]["name"].as_str() {
                out.push(name.to_owned());
            }
        }
    }
    out
}

/// Every workload (kind, name, pod spec) in every manifest under deploy/, examples included.
fn workloads() -> Result<Vec<(String, String, PathBuf, Value)>> {
    let mut out = Vec::new();
    for f in manifest_files(&deploy_dir())? {
        for d in documents(&f)? {
            let kind = d["kind"].as_str().unwrap_or_default().to_owned();
            let spec = match kind.as_str() {
                "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => {
                    d["spec"]["template"]["spec"].clone()
                }
                "Pod" => d["spec"].clone(),
                _ => continue,
            };
            let name = d["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            out.push((kind, name, f.clone(), spec));
        }
    }
    Ok(out)
}

/// Issue 13: the DaemonSet holds no key. It mounts no Secret at all; it presents a projected
/// ServiceAccount token for the CA's audience only, short-lived, where `--ca-token-file` reads
/// it; it reads the trust bundle from the ConfigMap the CA service reads too; and it asks the CA
/// Service by its name and gRPC port.
#[test]
fn daemonset_holds_no_key_and_presents_a_short_lived_token_for_the_ca() -> Result<()> {
    let ds = one_of_kind(&deploy_dir().join("daemonset.yaml"), "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    ensure!(secrets_mounted(pod).is_empty(), "the DaemonSet mounts Secrets: {:?}", secrets_mounted(pod));
    ensure!(flag(&args, "--ca-dir").is_none(), "no embedded CA in the default DaemonSet: {args:?}");
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml"))?;
    ensure!(!text.contains("ca-key.pem"), "no key file named anywhere in daemonset.yaml");

    // The token: projected, audience sluice-ca (what the CA checks), an hour at most.
    let token_file = flag(&args, "--ca-token-file").context("--ca-token-file")?;
    let (vol, ro) = volume_for(pod, c, &token_file)?;
    ensure!(ro, "the token volume is mounted read-only");
    let sources = vol["projected"]["sources"].as_sequence().context("a projected volume")?;
    ensure!(sources.len() == 1, "the token alone in its volume: {sources:?}");
    let sat = &sources[0]["serviceAccountToken"];
    let ca = one_of_kind(&deploy_dir().join("ca.yaml"), "Deployment")?;
    let ca_args = strings(&ca["spec"]["template"]["spec"]["containers"][0]["args"]);
    let audience = flag(&ca_args, "--audience").context("the CA's --audience")?;
    ensure!(sat["audience"].as_str() == Some(audience.as_str()), "token audience {:?} must be the CA's {audience}", sat["audience"]);
    ensure!(audience == "sluice-ca", "a dedicated audience, not the API server's: {audience}");
    let ttl = sat["expirationSeconds"].as_u64().context("expirationSeconds")?;
    ensure!((600..=3600).contains(&ttl), "short-lived token (kube's minimum is 600 s): {ttl}");
    ensure!(
        Path::new(&token_file).file_name().and_then(|n| n.to_str()) == sat["path"].as_str(),
        "--ca-token-file {token_file} names the token's path {:?}",
        sat["path"]
    );
    // The caller the CA accepts is this DaemonSet's ServiceAccount.
    ensure!(
        flag(&ca_args, "--node-service-account").as_deref()
            == Some(&format!("sluice-system/{}", pod["serviceAccountName"].as_str().unwrap_or_default())),
        "the CA's --node-service-account must be the DaemonSet's ServiceAccount"
    );

    // The trust bundle: a ConfigMap (public certificates), the same one the CA mounts.
    let bundle = flag(&args, "--ca-trust-bundle").context("--ca-trust-bundle")?;
    let (vol, ro) = volume_for(pod, c, &bundle)?;
    ensure!(ro, "the trust bundle is mounted read-only");
    let cm = vol["configMap"]["name"].as_str().context("the trust bundle comes from a ConfigMap")?;
    let ca_pod = &ca["spec"]["template"]["spec"];
    let ca_bundle = flag(&ca_args, "--trust-bundle").context("the CA's --trust-bundle")?;
    let (ca_vol, _) = volume_for(ca_pod, &ca_pod["containers"][0], &ca_bundle)?;
    ensure!(ca_vol["configMap"]["name"].as_str() == Some(cm), "the CA and the nodes read one trust bundle");

    // The CA's address: its Service, on the gRPC port.
    let addr = flag(&args, "--ca-addr").context("--ca-addr")?;
    let svc = one_of_kind(&deploy_dir().join("ca.yaml"), "Service")?;
    let port = svc["spec"]["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|p| p["appProtocol"] == "grpc")
        .context("the CA Service's gRPC port")?;
    let want = format!(
        "https://{}.{}.svc:{}",
        svc["metadata"]["name"].as_str().unwrap_or_default(),
        svc["metadata"]["namespace"].as_str().unwrap_or_default(),
        port["port"].as_u64().unwrap_or_default()
    );
    ensure!(addr == want, "--ca-addr {addr}, expected the CA Service {want}");
    Ok(())
}

/// Issue 13: the signing Secret is mounted by the CA Deployment and by nothing else in deploy/
/// (examples included), read-only and readable only by the CA's group; the CA's flags point
/// into that mount.
#[test]
fn only_the_ca_deployment_mounts_the_signing_secret() -> Result<()> {
    let ca = one_of_kind(&deploy_dir().join("ca.yaml"), "Deployment")?;
    let pod = &ca["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    let cert = flag(&args, "--signing-cert").context("--signing-cert")?;
    let key = flag(&args, "--signing-key").context("--signing-key")?;
    let (vol, ro) = volume_for(pod, c, &key)?;
    ensure!(ro, "the signing key is mounted read-only");
    let secret = vol["secret"]["secretName"].as_str().context("the signing key comes from a Secret")?;
    ensure!(volume_for(pod, c, &cert)?.0 == vol, "certificate and key from the same Secret");
    ensure!(file_mode(&vol["secret"]["defaultMode"]) == Some(0o440), "mode 0440: {:?}", vol["secret"]);
    ensure!(pod["securityContext"]["fsGroup"].is_u64(), "fsGroup gives the CA's group read access");

    let mounting: Vec<String> = workloads()?
        .into_iter()
        .filter(|(_, _, _, spec)| secrets_mounted(spec).iter().any(|s| s == secret))
        .map(|(kind, name, f, _)| format!("{kind}/{name} in {}", f.display()))
        .collect();
    ensure!(
        mounting.len() == 1 && mounting[0].starts_with("Deployment/sluice-ca in ") && mounting[0].ends_with("deploy/ca.yaml"),
        "only the CA Deployment may mount {secret}: {mounting:?}"
    );
    // No other workload of the default install mounts any Secret (the embedded-CA example is
    // the one labelled exception, checked below).
    for (kind, name, f, spec) in workloads()? {
        if f.starts_with(deploy_dir().join("examples")) || (kind == "Deployment" && name == "sluice-ca") {
            continue;
        }
        ensure!(secrets_mounted(&spec).is_empty(), "{kind}/{name} ({}) mounts Secrets", f.display());
    }
    Ok(())
}

/// The CA service: two replicas spread over nodes, kept through voluntary disruptions, behind a
/// Service with its gRPC and monitoring ports, probed on /healthz/ready, and running with no
/// privilege at all.
#[test]
fn ca_deployment_is_redundant_and_unprivileged() -> Result<()> {
    let path = deploy_dir().join("ca.yaml");
    let ca = one_of_kind(&path, "Deployment")?;
    ensure!(ca["spec"]["replicas"] == 2, "two replicas");
    let labels = &ca["spec"]["template"]["metadata"]["labels"];
    let pod = &ca["spec"]["template"]["spec"];
    let terms = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_sequence()
        .context("pod anti-affinity")?;
    ensure!(
        terms.iter().any(|t| t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            && t["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/name"]
                == labels["app.kubernetes.io/name"]),
        "replicas spread across nodes: {terms:?}"
    );
    let strategy = &ca["spec"]["strategy"]["rollingUpdate"];
    ensure!(strategy["maxUnavailable"] == 0, "an upgrade never drops below two ready replicas");

    let pdb = one_of_kind(&path, "PodDisruptionBudget")?;
    ensure!(pdb["spec"]["minAvailable"] == 1, "PDB minAvailable 1");
    ensure!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == labels["app.kubernetes.io/name"],
        "the PDB covers the CA's pods"
    );

    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    ensure!(args[..2] == ["ca", "serve"], "sluice ca serve: {args:?}");
    for want in [
        "--listen=0.0.0.0:15012",
        "--metrics-addr=0.0.0.0:15014",
        "--node-service-account=sluice-system/sluice",
        "--audience=sluice-ca",
        "--trust-domain=$(SLUICE_TRUST_DOMAIN)",
    ] {
        ensure!(args.iter().any(|a| a == want), "sluice ca serve needs {want}: {args:?}");
    }
    for f in ["--max-lifetime-s", "--node-rate", "--node-burst"] {
        ensure!(
            flag(&args, f).and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v > 0),
            "{f} set to a positive number: {args:?}"
        );
    }
    let ports: Vec<(String, u64)> = c["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().unwrap_or_default().to_owned(), p["containerPort"].as_u64().unwrap_or(0)))
        .collect();
    ensure!(
        ports == [("grpc-ca".to_owned(), 15012), ("http-monitoring".to_owned(), 15014)],
        "ports {ports:?}"
    );
    let ready = &c["readinessProbe"]["httpGet"];
    ensure!(
        ready["path"] == "/healthz/ready" && (ready["port"] == 15014 || ready["port"] == "http-monitoring"),
        "readiness is GET /healthz/ready on 15014: {ready:?}"
    );
    ensure!(c["livenessProbe"].is_mapping(), "a liveness probe");
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            ensure!(!c["resources"][k][r].is_null(), "resources.{k}.{r}");
        }
    }
    let sc = &c["securityContext"];
    ensure!(sc["allowPrivilegeEscalation"] == Value::Bool(false), "no privilege escalation");
    ensure!(sc["readOnlyRootFilesystem"] == Value::Bool(true), "read-only root filesystem");
    ensure!(strings(&sc["capabilities"]["drop"]) == ["ALL"], "drop ALL capabilities");
    ensure!(sc["capabilities"].get("add").is_none(), "no capability added");
    ensure!(sc["privileged"] != Value::Bool(true), "not privileged");
    ensure!(
        pod["securityContext"]["runAsNonRoot"] == Value::Bool(true)
            && pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u != 0),
        "runs as a non-root user"
    );
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        ensure!(pod[host] != Value::Bool(true), "no {host}");
    }

    let svc = one_of_kind(&path, "Service")?;
    ensure!(
        svc["metadata"]["name"] == "sluice-ca" && svc["metadata"]["namespace"] == "sluice-system",
        "Service sluice-system/sluice-ca"
    );
    ensure!(svc["spec"]["selector"] == ca["spec"]["selector"]["matchLabels"], "the Service selects the CA's pods");
    let svc_ports: Vec<(String, u64, String)> = svc["spec"]["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["port"].as_u64().unwrap_or(0),
                p["appProtocol"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    ensure!(
        svc_ports
            == [
                ("grpc-ca".to_owned(), 15012, "grpc".to_owned()),
                ("http-monitoring".to_owned(), 15014, "http".to_owned())
            ],
        "Service ports {svc_ports:?}"
    );
    ensure!(pod["serviceAccountName"] == "sluice-ca", "its own ServiceAccount");
    let sa = one_of_kind(&path, "ServiceAccount")?;
    ensure!(sa["metadata"]["name"] == "sluice-ca", "ServiceAccount sluice-ca defined beside it");
    Ok(())
}

/// The CA's RBAC: create TokenReviews and read pods, nothing else, bound to its own
/// ServiceAccount only; and the node agent's role cannot review tokens.
#[test]
fn ca_rbac_grants_exactly_what_the_ca_needs() -> Result<()> {
    let path = deploy_dir().join("ca.yaml");
    let role = one_of_kind(&path, "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().context("rules")? {
        ensure!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(), "{rule:?}");
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    ensure!(!g.contains('*') && !r.contains('*') && !v.contains('*'), "no wildcards: {g}/{r} {v}");
                    granted.insert(format!("{g}/{r} {v}"));
                }
            }
        }
    }
    let expected: BTreeSet<String> = [
        "authentication.k8s.io/tokenreviews create",
        "/pods get",
        "/pods list",
        "/pods watch",
    ]
    .map(String::from)
    .into_iter()
    .collect();
    ensure!(granted == expected, "granted {granted:?}, expected exactly {expected:?}");

    let binding = one_of_kind(&path, "ClusterRoleBinding")?;
    ensure!(binding["roleRef"]["name"] == role["metadata"]["name"], "binds the CA's role");
    let subjects = binding["subjects"].as_sequence().context("subjects")?;
    ensure!(
        subjects.len() == 1
            && subjects[0]["kind"] == "ServiceAccount"
            && subjects[0]["name"] == "sluice-ca"
            && subjects[0]["namespace"] == "sluice-system",
        "bound to the CA's ServiceAccount only: {subjects:?}"
    );
    // Nothing else in deploy/ is bound to the CA's role.
    for f in manifest_files(&deploy_dir())? {
        for d in documents(&f)? {
            if d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding" {
                ensure!(
                    d["roleRef"]["name"] != role["metadata"]["name"] || d == binding,
                    "{} binds the CA's role",
                    f.display()
                );
            }
        }
    }
    Ok(())
}

/// The embedded CA stays as a clearly labelled example for small setups, and is
/// deploy/daemonset.yaml with only the certificate source swapped: a change to the DaemonSet
/// that is not carried over fails here.
#[test]
fn embedded_ca_example_is_the_daemonset_with_only_the_ca_swapped() -> Result<()> {
    let dir = deploy_dir().join("examples/embedded-ca");
    let text = std::fs::read_to_string(dir.join("daemonset.yaml"))?;
    ensure!(
        text.starts_with("# EMBEDDED CA, FOR SMALL SETUPS ONLY: every node holds the mesh root key."),
        "the example says what it is in its first line"
    );
    let mut example = one_of_kind(&dir.join("daemonset.yaml"), "DaemonSet")?;
    let mut ds = one_of_kind(&deploy_dir().join("daemonset.yaml"), "DaemonSet")?;
    ensure!(example["metadata"]["labels"]["sluice.dev/ca"] == "embedded", "labelled sluice.dev/ca: embedded");

    // The example's CA: --ca-dir and the root Secret, mode 0400, read-only.
    let pod = &example["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    let ca_dir = flag(&args, "--ca-dir").context("--ca-dir")?;
    let (vol, ro) = volume_for(pod, c, &format!("{ca_dir}/ca-key.pem"))?;
    ensure!(ro && vol["secret"]["secretName"] == "sluice-ca" && file_mode(&vol["secret"]["defaultMode"]) == Some(0o400), "{vol:?}");
    ensure!(args.iter().all(|a| !a.starts_with("--ca-addr")), "no remote CA in the embedded example");

    // Everything else is the same.
    fn strip(ds: &mut Value, volumes: &[&str]) {
        if let Some(labels) = ds["metadata"]["labels"].as_mapping_mut() {
            labels.remove("sluice.dev/ca");
        }
        let pod = &mut ds["spec"]["template"]["spec"];
        let c = &mut pod["containers"][0];
        if let Some(args) = c["args"].as_sequence_mut() {
            args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with("--ca-")));
        }
        if let Some(mounts) = c["volumeMounts"].as_sequence_mut() {
            mounts.retain(|m| !volumes.iter().any(|v| m["name"] == *v));
        }
        if let Some(vols) = pod["volumes"].as_sequence_mut() {
            vols.retain(|m| !volumes.iter().any(|v| m["name"] == *v));
        }
    }
    strip(&mut example, &["ca"]);
    strip(&mut ds, &["trust-bundle", "ca-token"]);
    ensure!(
        example == ds,
        "examples/embedded-ca/daemonset.yaml differs from daemonset.yaml beyond the CA: regenerate it \
         (take daemonset.yaml, replace its --ca-addr/--ca-trust-bundle/--ca-token-file with \
         --ca-dir=/etc/sluice/ca and its trust-bundle and ca-token volumes with the sluice-ca Secret)"
    );
    Ok(())
}

/// The trust bundle ConfigMap is as sensitive as the signing key (issue 13, review finding 8):
/// an admission policy lets only who may update `trustbundles.sluice.dev` (cluster admins)
/// write it, bound to deny; nothing of sluice's is granted that.
#[test]
fn only_cluster_admins_write_the_trust_bundle() -> Result<()> {
    let path = deploy_dir().join("rbac.yaml");
    let policy = one_of_kind(&path, "ValidatingAdmissionPolicy")?;
    let binding = one_of_kind(&path, "ValidatingAdmissionPolicyBinding")?;
    ensure!(binding["spec"]["policyName"] == policy["metadata"]["name"], "{binding:?}");
    ensure!(strings(&binding["spec"]["validationActions"]) == ["Deny"], "{binding:?}");
    ensure!(policy["spec"]["failurePolicy"] == "Fail", "{policy:?}");
    let cond = policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap_or_default();
    ensure!(cond.contains("'sluice-system'") && cond.contains("'sluice-trust-bundle'"), "{cond}");
    let rule = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    ensure!(strings(&rule["resources"]) == ["configmaps"], "{rule:?}");
    ensure!(strings(&rule["operations"]) == ["CREATE", "UPDATE", "DELETE"], "{rule:?}");
    let check = policy["spec"]["validations"][0]["expression"].as_str().unwrap_or_default();
    ensure!(check.contains("resource('trustbundles')") && check.contains("check('update')"), "{check}");
    // No sluice role grants the virtual resource (nor writes anything).
    for f in manifest_files(&deploy_dir())? {
        for d in documents(&f)? {
            if d["kind"] == "ClusterRole" || d["kind"] == "Role" {
                let text = serde_yaml_ng::to_string(&d)?;
                ensure!(!text.contains("trustbundles"), "{} grants trustbundles", f.display());
            }
        }
    }
    Ok(())
}
