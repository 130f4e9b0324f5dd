//! From a user's manifests to what the playground builds: which namespaces exist and are in the
//! mesh, which pods the workload controllers would create (named as they name them, spread over
//! the nodes), which ClusterIP each Service gets, and which documents go to sluice as written.
//! Pure: nothing here touches the machine, so every rule is unit-tested.
//!
//! What becomes what:
//!
//! | kind | the playground |
//! |---|---|
//! | Namespace | written for sluice; enrolled as written (`sluice.dev/mesh: enabled`), or when Istio's `istio-injection: enabled` / `istio.io/dataplane-mode: ambient` label says so (the playground then adds sluice's annotation) |
//! | (a namespace used but not declared) | created, enrolled: the playground is there to try the mesh |
//! | ServiceAccount | recorded: a pod naming one that does not exist is refused, as the API server would |
//! | Deployment, ReplicaSet, StatefulSet, DaemonSet, Pod | pods (see [`PodPlan`]) |
//! | Service | a ClusterIP when it has none, and EndpointSlices for its selector (see [`super::endpoints`]) |
//! | ConfigMap, Secret, RBAC, PodDisruptionBudget, HPA, NetworkPolicy, Job, CronJob, ... | not simulated: listed as ignored |
//! | anything else (routes, Istio resources, TrafficPolicy, EndpointSlices, ...) | passed to sluice's manifest directory as written, one object per file (see [`super::apply`]) |

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::manifest::{Owner, MESH_ANNOTATION};

/// Most nodes a playground may have (each node is a network namespace with a sluice).
pub const MAX_NODES: usize = 16;
/// Most pods per node (the simulator's own bound is 253 addresses per node).
pub const MAX_PODS_PER_NODE: usize = 250;
/// Most manifest documents read from a directory (a playground is for trying things).
pub const MAX_DOCUMENTS: usize = 5_000;
/// The ClusterIP range: 10.96.0.0/16, allocated from 10.96.0.10 up, as kube-apiserver's
/// default service CIDR starts (the first addresses are kept for cluster DNS and the API).
const CLUSTER_IP_FIRST: u32 = u32::from_be_bytes([10, 96, 0, 10]);
const CLUSTER_IP_LAST: u32 = u32::from_be_bytes([10, 96, 255, 254]);

/// One document of the user's manifests, with where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's name (no directory).
    pub file: String,
    /// 1-based document number in the file (items of a `List` share their list's number).
    pub document: usize,
    pub doc: Value,
}

impl Source {
    pub fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    /// `metadata.namespace`, or `default` as kubectl applies a namespaced object without one.
    pub fn namespace(&self) -> &str {
        self.doc["metadata"]["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or("default")
    }

    /// `file (document N) Kind namespace/name`, for messages.
    pub fn origin(&self) -> String {
        let obj = if CLUSTER_SCOPED.contains(&self.kind()) {
            self.name().to_string()
        } else {
            format!("{}/{}", self.namespace(), self.name())
        };
        format!("{} (document {}) {} {obj}", self.file, self.document, self.kind())
    }
}

/// Kinds without a namespace.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "IngressClass",
    "GatewayClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
];

/// Kinds the playground does not simulate, with why (listed, never passed to sluice, which
/// would reject the file).
fn ignored_because(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "ConfigMap" | "Secret" => "configuration data: the stand-in workloads do not read it",
        "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding" => {
            "Kubernetes RBAC: there is no API server to authorize"
        }
        "PodDisruptionBudget" | "HorizontalPodAutoscaler" | "VerticalPodAutoscaler" => {
            "no evictions or autoscaling in the playground"
        }
        "NetworkPolicy" => "NetworkPolicies are not enforced by the simulated nodes",
        "LimitRange" | "ResourceQuota" | "PriorityClass" => "no resource accounting in the playground",
        "PersistentVolumeClaim" | "PersistentVolume" | "StorageClass" => "no storage in the playground",
        "Job" | "CronJob" => "run-to-completion workloads are not simulated",
        "CustomResourceDefinition" => "CRDs need no installing: sluice reads its kinds as they are",
        "Ingress" | "IngressClass" | "GatewayClass" => "no ingress controller in the playground",
        "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration" => "no admission webhooks",
        _ => return None,
    })
}

/// Reads each path: a file, or every manifest directly in a directory (see [`read_dir`]), in
/// the order given (as `kubectl apply -f A -f B`).
pub fn read_paths(paths: &[std::path::PathBuf]) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(read_dir(p)?);
        } else {
            let text = fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.extend(read_str(&name, &text)?);
        }
        if out.len() > MAX_DOCUMENTS {
            bail!("more than {MAX_DOCUMENTS} documents: too many for a playground");
        }
    }
    if out.is_empty() {
        bail!("no Kubernetes object in {paths:?}");
    }
    Ok(out)
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (not its subdirectories,
/// as `kubectl apply -f DIR`), in name order; `kind: List` documents are expanded.
pub fn read_dir(dir: &Path) -> Result<Vec<Source>> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no manifest (*.yaml, *.yml or *.json)", dir.display());
    }
    let mut out = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.extend(read_str(&name, &text)?);
        if out.len() > MAX_DOCUMENTS {
            bail!("{} holds more than {MAX_DOCUMENTS} documents: too many for a playground", dir.display());
        }
    }
    Ok(out)
}

/// The documents of one file's text (YAML, JSON being a subset of it).
pub fn read_str(file: &str, text: &str) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let doc = Value::deserialize(de)
            .with_context(|| format!("{file} (document {document}): not valid YAML"))?;
        match &doc {
            Value::Null => continue,
            Value::Object(_) => {}
            _ => bail!("{file} (document {document}): not a Kubernetes object (a mapping)"),
        }
        if doc["kind"] == "List" {
            for item in doc["items"].as_array().into_iter().flatten() {
                out.push(Source { file: file.to_string(), document, doc: item.clone() });
            }
        } else {
            out.push(Source { file: file.to_string(), document, doc });
        }
    }
    for s in &out {
        if s.kind().is_empty() || s.doc["apiVersion"].as_str().is_none_or(str::is_empty) {
            bail!("{}: missing kind or apiVersion", s.origin());
        }
        if s.name().is_empty() {
            bail!("{}: missing metadata.name", s.origin());
        }
    }
    Ok(out)
}

/// A namespace the playground writes for sluice.
#[derive(Debug, Clone)]
pub struct NamespacePlan {
    pub name: String,
    /// The Namespace document written (the user's, or one the playground made).
    pub doc: Value,
    pub enrolled: bool,
    /// Why it is (not) in the mesh, for the summary.
    pub why: String,
}

/// A container as the stand-ins need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// TCP ports (`name`, `containerPort`).
    pub ports: Vec<(Option<String>, u16)>,
    /// `env[].value` (variables from `valueFrom` are not known here).
    pub env: BTreeMap<String, String>,
}

/// One pod the controllers would create.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The controller written into `ownerReferences` (the ReplicaSet of a Deployment's pod).
    pub owner: Option<Owner>,
    pub generate_name: Option<String>,
    /// 0-based node index.
    pub node: usize,
    pub containers: Vec<Container>,
    /// `Deployment bookinfo/reviews-v2` etc.
    pub origin: String,
}

impl PodPlan {
    /// The container port named `name`, if any container has it.
    pub fn named_port(&self, name: &str) -> Option<u16> {
        self.containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|(n, _)| n.as_deref() == Some(name))
            .map(|(_, p)| *p)
    }
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// A number, a container port name, or none (= `port`).
    pub target: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A Service the playground writes for sluice.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub namespace: String,
    pub name: String,
    /// The user's document with `clusterIP`/`clusterIPs` filled in when it had none.
    pub doc: Value,
    /// `None` for a headless Service (`clusterIP: None`).
    pub cluster_ip: Option<Ipv4Addr>,
    /// Whether the playground chose the ClusterIP (or the user wrote it).
    pub allocated: bool,
    /// `spec.selector`; none: the user provides EndpointSlices (passed through).
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Vec<ServicePort>,
}

/// A document passed to sluice as written.
#[derive(Debug, Clone)]
pub struct PassThrough {
    /// The file it is written as in sluice's manifest directory.
    pub file_name: String,
    pub origin: String,
    pub doc: Value,
}

/// Everything the playground will build.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub nodes: usize,
    pub namespaces: Vec<NamespacePlan>,
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
    pub passthrough: Vec<PassThrough>,
    /// (origin, why) of documents not simulated.
    pub ignored: Vec<(String, String)>,
}

impl Plan {
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServicePlan> {
        self.services.iter().find(|s| s.namespace == namespace && s.name == name)
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespacePlan> {
        self.namespaces.iter().find(|n| n.name == name)
    }
}

// ---------------------------------------------------------------- typed views of the workloads

/// The fields of a pod template the playground reads; everything else (resources, probes,
/// volumes, security contexts...) is accepted and not simulated.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodTemplate {
    #[serde(default)]
    metadata: TemplateMeta,
    #[serde(default)]
    spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
struct TemplateMeta {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName, still honoured by the API server.
    service_account: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    containers: Vec<ContainerSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerSpec {
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    ports: Vec<ContainerPortSpec>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortSpec {
    name: Option<String>,
    container_port: u16,
    protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct EnvVar {
    name: String,
    value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadSpec {
    replicas: Option<u32>,
    selector: Option<LabelSelector>,
    #[serde(default)]
    template: Option<PodTemplate>,
}

fn typed<T: serde::de::DeserializeOwned>(src: &Source, v: &Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone()).with_context(|| format!("{}: {what}", src.origin()))
}

impl PodSpec {
    fn service_account(&self) -> String {
        self.service_account_name
            .clone()
            .or_else(|| self.service_account.clone())
            .unwrap_or_else(|| "default".into())
    }

    fn containers(&self, src: &Source) -> Result<Vec<Container>> {
        if self.containers.is_empty() {
            bail!("{}: the pod template has no containers", src.origin());
        }
        Ok(self
            .containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                image: c.image.clone(),
                ports: c
                    .ports
                    .iter()
                    .filter(|p| p.protocol.as_deref().is_none_or(|pr| pr.eq_ignore_ascii_case("TCP")))
                    .map(|p| (p.name.clone(), p.container_port))
                    .collect(),
                env: c.env.iter().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect(),
            })
            .collect())
    }
}

// ---------------------------------------------------------------- controller naming

/// The characters Kubernetes uses for generated name suffixes and template hashes
/// (`k8s.io/apimachinery/pkg/util/rand`: no vowels, no confusable digits).
pub const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A template hash as controllers write it (`pod-template-hash`, `controller-revision-hash`):
/// a 32-bit FNV-1a hash of the pod template, its decimal digits mapped onto [`NAME_ALPHABET`]
/// as Kubernetes' `SafeEncodeString` does. (Kubernetes hashes its own printing of the Go
/// struct, so the value differs from a real cluster's; the shape is the same.)
pub fn template_hash(template: &Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.to_string().bytes().map(|d| NAME_ALPHABET[usize::from(d) % NAME_ALPHABET.len()] as char).collect()
}

/// Where random name suffixes come from (5 characters of [`NAME_ALPHABET`], as `generateName`
/// gets): the machine's randomness in the playground, a counter in unit tests.
pub trait Suffixes {
    fn next(&mut self) -> String;
}

/// Suffixes from /dev/urandom.
pub struct RandomSuffixes;

impl Suffixes for RandomSuffixes {
    fn next(&mut self) -> String {
        let bytes = crate::util::random_bytes(5).unwrap_or_else(|_| vec![0; 5]);
        bytes.iter().map(|b| NAME_ALPHABET[usize::from(*b) % NAME_ALPHABET.len()] as char).collect()
    }
}

// ---------------------------------------------------------------- planning

/// Picks the node with the fewest pods so far (the lowest index among equals), as a spreading
/// scheduler would for pods that ask for nothing in particular.
struct Scheduler {
    load: Vec<usize>,
}

impl Scheduler {
    fn place(&mut self) -> usize {
        let (i, _) = self.load.iter().enumerate().min_by_key(|(i, l)| (**l, *i)).expect("at least one node");
        self.load[i] += 1;
        i
    }

    fn place_on(&mut self, node: usize) -> usize {
        self.load[node] += 1;
        node
    }
}

/// Turns the user's documents into a plan for `nodes` nodes. Every problem found is reported at
/// once, each with the file, document and object it is about.
pub fn plan(sources: &[Source], nodes: usize, suffixes: &mut dyn Suffixes) -> Result<Plan> {
    if nodes == 0 || nodes > MAX_NODES {
        bail!("a playground has 1 to {MAX_NODES} nodes (asked for {nodes})");
    }
    let mut errors: Vec<String> = Vec::new();
    let mut plan = Plan { nodes, ..Plan::default() };
    let mut service_accounts: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen: BTreeMap<(String, String, String), String> = BTreeMap::new();
    let mut sched = Scheduler { load: vec![0; nodes] };
    let mut used_namespaces: BTreeSet<String> = BTreeSet::new();

    for src in sources {
        let kind = src.kind().to_string();
        let ns =
            if CLUSTER_SCOPED.contains(&kind.as_str()) { String::new() } else { src.namespace().to_string() };
        if let Some(first) = seen.insert((kind.clone(), ns.clone(), src.name().to_string()), src.origin()) {
            errors.push(format!("{}: defined twice (first in {first})", src.origin()));
            continue;
        }
        if !ns.is_empty() {
            used_namespaces.insert(ns.clone());
        }
        let api = src.doc["apiVersion"].as_str().unwrap_or("");
        let res = match (kind.as_str(), api) {
            ("Namespace", "v1") => {
                plan.namespaces.push(declared_namespace(src));
                Ok(())
            }
            ("ServiceAccount", "v1") => {
                service_accounts.insert((ns.clone(), src.name().to_string()));
                Ok(())
            }
            ("Service", "v1") => service(src).map(|s| {
                if let Some(s) = s {
                    plan.services.push(s)
                } else {
                    plan.passthrough.push(pass_through(src));
                }
            }),
            ("Pod", "v1") => bare_pod(src, &mut sched).map(|p| plan.pods.push(p)),
            ("Deployment" | "ReplicaSet" | "StatefulSet", "apps/v1") => {
                workload(src, &kind, &mut sched, suffixes).map(|p| plan.pods.extend(p))
            }
            ("DaemonSet", "apps/v1") => {
                daemon_set(src, nodes, &mut sched, suffixes).map(|p| plan.pods.extend(p))
            }
            (k, _) if ignored_because(k).is_some() => {
                plan.ignored.push((src.origin(), ignored_because(k).unwrap_or_default().to_string()));
                Ok(())
            }
            (
                "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Pod" | "Service" | "Namespace"
                | "ServiceAccount",
                _,
            ) => Err(anyhow::anyhow!(
                "{}: apiVersion {api:?} is not served for {kind} (use apps/v1 or v1)",
                src.origin()
            )),
            _ => {
                plan.passthrough.push(pass_through(src));
                Ok(())
            }
        };
        if let Err(e) = res {
            errors.push(format!("{e:#}"));
        }
    }

    // Namespaces used but not declared: created, in the mesh.
    for ns in used_namespaces {
        if plan.namespace(&ns).is_none() {
            plan.namespaces.push(NamespacePlan {
                doc: crate::manifest::namespace(&ns, true),
                name: ns,
                enrolled: true,
                why: "not declared: the playground creates it in the mesh".into(),
            });
        }
    }
    plan.namespaces.sort_by(|a, b| a.name.cmp(&b.name));

    // The API server refuses a pod whose ServiceAccount does not exist ("default" always does).
    for p in &plan.pods {
        if p.service_account != "default"
            && !service_accounts.contains(&(p.namespace.clone(), p.service_account.clone()))
        {
            errors.push(format!(
                "{}: serviceAccountName {:?} is not defined in namespace {} (Kubernetes would not create its pods): add the ServiceAccount",
                p.origin, p.service_account, p.namespace
            ));
        }
    }
    let mut names = BTreeSet::new();
    for p in &plan.pods {
        if !names.insert((p.namespace.clone(), p.name.clone())) {
            errors.push(format!("{}: pod {}/{} exists twice", p.origin, p.namespace, p.name));
        }
        if p.name.len() > 63 {
            errors.push(format!(
                "{}: pod name {:?} is longer than the playground's 63 characters (it also names a network namespace)",
                p.origin, p.name
            ));
        }
    }
    for (i, load) in sched.load.iter().enumerate() {
        if *load > MAX_PODS_PER_NODE {
            errors.push(format!(
                "node-{} would hold {load} pods, more than the playground's {MAX_PODS_PER_NODE} per node: add nodes (--nodes) or lower replicas",
                i + 1
            ));
        }
    }
    if let Err(e) = allocate_cluster_ips(&mut plan.services) {
        errors.push(format!("{e:#}"));
    }
    if !errors.is_empty() {
        bail!("the manifests cannot be built into a playground:\n  {}", errors.join("\n  "));
    }
    Ok(plan)
}

fn declared_namespace(src: &Source) -> NamespacePlan {
    let mut doc = src.doc.clone();
    let meta = &doc["metadata"];
    let annotation = meta["annotations"][MESH_ANNOTATION].as_str().map(str::to_string);
    let injection = meta["labels"]["istio-injection"].as_str().map(str::to_string);
    let ambient = meta["labels"]["istio.io/dataplane-mode"].as_str().map(str::to_string);
    let (enrolled, why) = match (annotation.as_deref(), injection.as_deref(), ambient.as_deref()) {
        (Some("enabled"), _, _) => (true, format!("annotated {MESH_ANNOTATION}: enabled")),
        (Some(other), _, _) => (false, format!("annotated {MESH_ANNOTATION}: {other}")),
        (None, Some("enabled"), _) => {
            (true, "labelled istio-injection: enabled (the playground adds sluice's annotation)".into())
        }
        (None, _, Some("ambient")) => (
            true,
            "labelled istio.io/dataplane-mode: ambient (the playground adds sluice's annotation)".into(),
        ),
        _ => (false, format!("declared without {MESH_ANNOTATION}: enabled (or Istio's injection label)")),
    };
    if enrolled && annotation.is_none() {
        doc = crate::manifest::with_annotation(doc, MESH_ANNOTATION, "enabled");
    }
    NamespacePlan { name: src.name().to_string(), doc, enrolled, why }
}

fn pass_through(src: &Source) -> PassThrough {
    PassThrough { file_name: super::apply::object_file(src), origin: src.origin(), doc: src.doc.clone() }
}

/// A Service the playground completes, or `None` for one passed as written (ExternalName).
fn service(src: &Source) -> Result<Option<ServicePlan>> {
    let spec = &src.doc["spec"];
    if spec["type"] == "ExternalName" {
        return Ok(None);
    }
    if spec["ipFamilyPolicy"] == "RequireDualStack"
        || spec["ipFamilies"].as_array().is_some_and(|f| f.iter().any(|x| x == "IPv6"))
    {
        bail!(
            "{}: the playground is IPv4-only (ipFamilyPolicy RequireDualStack or an IPv6 family)",
            src.origin()
        );
    }
    let cluster_ip =
        match spec["clusterIP"].as_str() {
            None | Some("") => None,
            Some("None") => Some(None),
            Some(ip) => Some(Some(ip.parse::<Ipv4Addr>().with_context(|| {
                format!("{}: spec.clusterIP {ip:?} is not an IPv4 address", src.origin())
            })?)),
        };
    let mut ports = Vec::new();
    for (i, p) in spec["ports"].as_array().into_iter().flatten().enumerate() {
        if p["protocol"].as_str().is_some_and(|pr| !pr.eq_ignore_ascii_case("TCP")) {
            continue; // UDP/SCTP: sluice handles TCP only
        }
        let port = p["port"]
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .with_context(|| format!("{}: spec.ports[{i}].port is not a port number", src.origin()))?;
        let target = match &p["targetPort"] {
            Value::Null => TargetPort::Number(port),
            Value::Number(n) => TargetPort::Number(
                n.as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0).with_context(|| {
                    format!("{}: spec.ports[{i}].targetPort is not a port number", src.origin())
                })?,
            ),
            Value::String(s) => match s.parse::<u16>() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s.clone()),
            },
            _ => bail!("{}: spec.ports[{i}].targetPort must be a number or a port name", src.origin()),
        };
        ports.push(ServicePort {
            name: p["name"].as_str().map(str::to_string),
            port,
            target,
            app_protocol: p["appProtocol"].as_str().map(str::to_string),
        });
    }
    let selector = spec["selector"].as_object().map(|m| {
        m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect::<BTreeMap<_, _>>()
    });
    Ok(Some(ServicePlan {
        namespace: src.namespace().to_string(),
        name: src.name().to_string(),
        doc: src.doc.clone(),
        cluster_ip: cluster_ip.flatten(),
        allocated: cluster_ip.is_none(),
        selector,
        ports,
    }))
}

/// Gives every Service without a ClusterIP the next free one (in namespace/name order, so the
/// same manifests get the same addresses), and writes it into the document.
fn allocate_cluster_ips(services: &mut [ServicePlan]) -> Result<()> {
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for s in services.iter().filter(|s| !s.allocated) {
        if let Some(ip) = s.cluster_ip {
            if let Some(other) = taken.insert(ip, format!("{}/{}", s.namespace, s.name)) {
                bail!("Services {other} and {}/{} both ask for ClusterIP {ip}", s.namespace, s.name);
            }
        }
    }
    let mut order: Vec<usize> = (0..services.len()).filter(|&i| services[i].allocated).collect();
    order.sort_by(|&a, &b| {
        (&services[a].namespace, &services[a].name).cmp(&(&services[b].namespace, &services[b].name))
    });
    let mut next = CLUSTER_IP_FIRST;
    for i in order {
        while taken.contains_key(&Ipv4Addr::from(next)) {
            next += 1;
        }
        if next > CLUSTER_IP_LAST {
            bail!("the playground's ClusterIP range 10.96.0.0/16 is exhausted");
        }
        let ip = Ipv4Addr::from(next);
        next += 1;
        let s = &mut services[i];
        taken.insert(ip, format!("{}/{}", s.namespace, s.name));
        s.cluster_ip = Some(ip);
        s.doc["spec"]["clusterIP"] = json!(ip.to_string());
        s.doc["spec"]["clusterIPs"] = json!([ip.to_string()]);
    }
    Ok(())
}

fn bare_pod(src: &Source, sched: &mut Scheduler) -> Result<PodPlan> {
    let spec: PodSpec = typed(src, &src.doc["spec"], "spec")?;
    if spec.host_network {
        bail!("{}: hostNetwork pods are not simulated (they are not in the mesh either)", src.origin());
    }
    let labels = src.doc["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Ok(PodPlan {
        namespace: src.namespace().to_string(),
        name: src.name().to_string(),
        labels,
        service_account: spec.service_account(),
        owner: None,
        generate_name: None,
        node: sched.place(),
        containers: spec.containers(src)?,
        origin: format!("Pod {}/{}", src.namespace(), src.name()),
    })
}

/// The template of a workload, checked as the API server checks it: a selector that selects
/// the template's labels.
fn template_of(src: &Source) -> Result<(WorkloadSpec, PodTemplate, Value)> {
    let spec: WorkloadSpec = typed(src, &src.doc["spec"], "spec")?;
    let raw = src.doc["spec"]["template"].clone();
    let tpl: PodTemplate = typed(src, &raw, "spec.template")?;
    let _ = &spec.template;
    let selector =
        spec.selector.as_ref().with_context(|| format!("{}: spec.selector is required", src.origin()))?;
    if selector.match_labels.is_empty() && selector.match_expressions.is_empty() {
        bail!("{}: spec.selector selects nothing (give matchLabels)", src.origin());
    }
    for (k, v) in &selector.match_labels {
        if tpl.metadata.labels.get(k) != Some(v) {
            bail!(
                "{}: spec.selector.matchLabels {k}={v} does not match the template's labels {:?} (the API server refuses this)",
                src.origin(),
                tpl.metadata.labels
            );
        }
    }
    if tpl.spec.host_network {
        bail!("{}: hostNetwork pods are not simulated (they are not in the mesh either)", src.origin());
    }
    Ok((spec, tpl, raw))
}

fn workload(
    src: &Source,
    kind: &str,
    sched: &mut Scheduler,
    suffixes: &mut dyn Suffixes,
) -> Result<Vec<PodPlan>> {
    let (spec, tpl, raw) = template_of(src)?;
    let replicas = spec.replicas.unwrap_or(1) as usize;
    if replicas > MAX_PODS_PER_NODE * MAX_NODES {
        bail!("{}: {replicas} replicas is more than a playground holds", src.origin());
    }
    let ns = src.namespace().to_string();
    let name = src.name().to_string();
    let containers = tpl.spec.containers(src)?;
    let hash = template_hash(&raw);
    let origin = format!("{kind} {ns}/{name}");
    let mut pods = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let mut labels = tpl.metadata.labels.clone();
        let (pod_name, owner, generate_name) = match kind {
            "Deployment" => {
                // The Deployment's ReplicaSet is named after the template's hash, and labels
                // its pods with it.
                let rs = format!("{name}-{hash}");
                labels.insert("pod-template-hash".into(), hash.clone());
                (
                    format!("{rs}-{}", suffixes.next()),
                    Owner { kind: "ReplicaSet".into(), name: rs.clone() },
                    Some(format!("{rs}-")),
                )
            }
            "ReplicaSet" => (
                format!("{name}-{}", suffixes.next()),
                Owner { kind: "ReplicaSet".into(), name: name.clone() },
                Some(format!("{name}-")),
            ),
            _ => {
                // StatefulSet: stable ordinal names, and the labels its controller adds.
                let pod = format!("{name}-{i}");
                labels.insert("statefulset.kubernetes.io/pod-name".into(), pod.clone());
                labels.insert("apps.kubernetes.io/pod-index".into(), i.to_string());
                labels.insert("controller-revision-hash".into(), format!("{name}-{hash}"));
                (pod, Owner { kind: "StatefulSet".into(), name: name.clone() }, None)
            }
        };
        pods.push(PodPlan {
            namespace: ns.clone(),
            name: pod_name,
            labels,
            service_account: tpl.spec.service_account(),
            owner: Some(owner),
            generate_name,
            node: sched.place(),
            containers: containers.clone(),
            origin: origin.clone(),
        });
    }
    Ok(pods)
}

fn daemon_set(
    src: &Source,
    nodes: usize,
    sched: &mut Scheduler,
    suffixes: &mut dyn Suffixes,
) -> Result<Vec<PodPlan>> {
    let (_, tpl, raw) = template_of(src)?;
    let ns = src.namespace().to_string();
    let name = src.name().to_string();
    let containers = tpl.spec.containers(src)?;
    let hash = template_hash(&raw);
    Ok((0..nodes)
        .map(|node| {
            let mut labels = tpl.metadata.labels.clone();
            labels.insert("controller-revision-hash".into(), hash.clone());
            labels.insert("pod-template-generation".into(), "1".into());
            PodPlan {
                namespace: ns.clone(),
                name: format!("{name}-{}", suffixes.next()),
                labels,
                service_account: tpl.spec.service_account(),
                owner: Some(Owner { kind: "DaemonSet".into(), name: name.clone() }),
                generate_name: Some(format!("{name}-")),
                node: sched.place_on(node),
                containers: containers.clone(),
                origin: format!("DaemonSet {ns}/{name}"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u32);
    impl Suffixes for Counter {
        fn next(&mut self) -> String {
            self.0 += 1;
            format!("x{:04}", self.0)
        }
    }

    fn plan_of(yaml: &str, nodes: usize) -> Result<Plan> {
        plan(&read_str("app.yaml", yaml)?, nodes, &mut Counter(0))
    }

    const APP: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: web}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: 10.96.0.10
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v1}}
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: example.com/web:1.0
        ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]
        env: [{name: MODE, value: fast}, {name: SECRET, valueFrom: {secretKeyRef: {name: s, key: k}}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
spec:
  replicas: 2
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: postgres:16, ports: [{containerPort: 5432}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
"#;

    #[test]
    fn workloads_become_pods_named_as_their_controllers_name_them() {
        let p = plan_of(APP, 2).unwrap();
        let web: Vec<&PodPlan> =
            p.pods.iter().filter(|x| x.labels.get("app").map(String::as_str) == Some("web")).collect();
        assert_eq!(web.len(), 3);
        let hash = &web[0].labels["pod-template-hash"];
        assert!(!hash.is_empty() && hash.len() <= 10, "{hash}");
        assert!(hash.bytes().all(|b| NAME_ALPHABET.contains(&b)), "{hash}");
        let rs = format!("web-{hash}");
        for (i, pod) in web.iter().enumerate() {
            assert_eq!(pod.name, format!("{rs}-x{:04}", i + 1));
            assert_eq!(pod.owner, Some(Owner { kind: "ReplicaSet".into(), name: rs.clone() }));
            assert_eq!(pod.generate_name.as_deref(), Some(format!("{rs}-").as_str()));
            assert_eq!(pod.namespace, "default");
            assert_eq!(pod.service_account, "web");
            assert_eq!(pod.labels["version"], "v1");
        }
        assert_eq!(web[0].containers[0].ports, vec![(Some("http".into()), 8080)], "UDP ports are dropped");
        assert_eq!(web[0].containers[0].env, BTreeMap::from([("MODE".to_string(), "fast".to_string())]));
        let db: Vec<&PodPlan> = p.pods.iter().filter(|x| x.namespace == "data").collect();
        assert_eq!(db.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["db-0", "db-1"]);
        assert_eq!(db[1].labels["statefulset.kubernetes.io/pod-name"], "db-1");
        assert_eq!(db[1].labels["apps.kubernetes.io/pod-index"], "1");
        assert_eq!(db[0].owner, Some(Owner { kind: "StatefulSet".into(), name: "db".into() }));
        assert_eq!(db[0].generate_name, None);
        // Five pods over two nodes: spread, never more than one apart.
        let on0 = p.pods.iter().filter(|x| x.node == 0).count();
        assert!(on0 == 3 || on0 == 2, "{on0}");
        // The same template gives the same hash; another template another one.
        assert_eq!(plan_of(APP, 2).unwrap().pods[0].labels["pod-template-hash"], *hash);
    }

    #[test]
    fn services_get_cluster_ips_around_the_ones_written() {
        let p = plan_of(APP, 1).unwrap();
        let db = p.service("data", "db").unwrap();
        assert_eq!(db.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert!(!db.allocated);
        assert_eq!(db.ports[0].target, TargetPort::Number(5432));
        let web = p.service("default", "web").unwrap();
        assert!(web.allocated);
        assert_eq!(web.cluster_ip, Some("10.96.0.11".parse().unwrap()), "10.96.0.10 is taken by data/db");
        assert_eq!(web.doc["spec"]["clusterIP"], "10.96.0.11");
        assert_eq!(web.doc["spec"]["clusterIPs"], json!(["10.96.0.11"]));
        assert_eq!(web.ports[0].target, TargetPort::Name("http".into()));
        assert_eq!(web.selector, Some(BTreeMap::from([("app".to_string(), "web".to_string())])));
    }

    #[test]
    fn namespaces_other_kinds_and_what_is_ignored() {
        let p = plan_of(APP, 1).unwrap();
        let names: Vec<&str> = p.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["data", "default"]);
        assert!(p.namespaces.iter().all(|n| n.enrolled), "undeclared namespaces are in the mesh");
        assert_eq!(p.namespaces[1].doc["metadata"]["annotations"][MESH_ANNOTATION], "enabled");
        assert_eq!(p.passthrough.len(), 1);
        assert_eq!(p.passthrough[0].doc["kind"], "VirtualService");
        assert_eq!(p.passthrough[0].file_name, "obj-virtualservice-default-web.yaml");
        assert!(
            p.passthrough[0].origin.contains("VirtualService default/web"),
            "{}",
            p.passthrough[0].origin
        );
        assert_eq!(p.ignored.len(), 1);
        assert!(p.ignored[0].0.contains("ConfigMap default/settings"));
    }

    #[test]
    fn declared_namespaces_are_enrolled_as_written_or_by_istios_labels() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: c, annotations: {sluice.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: d}
---
apiVersion: v1
kind: Namespace
metadata: {name: e, labels: {istio-injection: disabled}}
"#;
        let p = plan_of(yaml, 1).unwrap();
        let e: Vec<(&str, bool)> = p.namespaces.iter().map(|n| (n.name.as_str(), n.enrolled)).collect();
        assert_eq!(e, [("a", true), ("b", true), ("c", true), ("d", false), ("e", false)]);
        assert_eq!(p.namespaces[0].doc["metadata"]["annotations"][MESH_ANNOTATION], "enabled");
        assert_eq!(
            p.namespaces[0].doc["metadata"]["labels"]["istio-injection"], "enabled",
            "the rest as written"
        );
        assert!(p.namespaces[3].doc["metadata"]["annotations"].is_null());
    }

    #[test]
    fn problems_are_all_reported_with_where_they_are() {
        let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: a}
spec:
  selector: {matchLabels: {app: other}}
  template: {metadata: {labels: {app: a}}, spec: {containers: [{name: a, image: x}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: b}
spec:
  selector: {matchLabels: {app: b}}
  template: {metadata: {labels: {app: b}}, spec: {serviceAccountName: ghost, containers: [{name: b, image: x}]}}
---
apiVersion: v1
kind: Service
metadata: {name: s1}
spec: {clusterIP: 10.96.5.5, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: s2}
spec: {clusterIP: 10.96.5.5, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: s2}
spec: {ports: [{port: 80}]}
"#;
        let e = plan_of(yaml, 1).unwrap_err().to_string();
        assert!(
            e.contains("app.yaml (document 1) Deployment default/a: spec.selector.matchLabels app=other"),
            "{e}"
        );
        assert!(e.contains("serviceAccountName \"ghost\" is not defined in namespace default"), "{e}");
        assert!(e.contains("both ask for ClusterIP 10.96.5.5"), "{e}");
        assert!(e.contains("app.yaml (document 5) Service default/s2: defined twice"), "{e}");
        assert!(plan_of(APP, 0).is_err());
        assert!(plan_of(APP, MAX_NODES + 1).is_err());
    }

    #[test]
    fn daemon_sets_run_one_pod_per_node_and_lists_are_expanded() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: agent, namespace: ops}
  spec:
    selector: {matchLabels: {app: agent}}
    template: {metadata: {labels: {app: agent}}, spec: {containers: [{name: a, image: agent:1}]}}
- apiVersion: v1
  kind: Pod
  metadata: {name: shell, namespace: ops, labels: {app: shell}}
  spec: {containers: [{name: sh, image: curlimages/curl}]}
"#;
        let p = plan_of(yaml, 3).unwrap();
        let agents: Vec<usize> =
            p.pods.iter().filter(|x| x.labels["app"] == "agent").map(|x| x.node).collect();
        assert_eq!(agents, [0, 1, 2]);
        let shell = p.pods.iter().find(|x| x.name == "shell").unwrap();
        assert_eq!(shell.owner, None);
        assert_eq!(shell.node, 0, "all nodes hold one agent: the lowest index takes the next pod");
    }
}
