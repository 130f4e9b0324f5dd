//! Realistic manifests, shaped like `kubectl get -o yaml` output: they carry fields sluice
//! ignores (managedFields, status.conditions, containers, ownerReferences, ...).

pub const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  annotations:
    sluice.dev/mesh: enabled
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop"}}
  creationTimestamp: "2024-05-02T10:11:12Z"
  labels:
    kubernetes.io/metadata.name: shop
    team: storefront
  managedFields:
  - apiVersion: v1
    fieldsType: FieldsV1
    fieldsV1:
      f:metadata:
        f:labels:
          .: {}
          f:kubernetes.io/metadata.name: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-05-02T10:11:12Z"
  name: shop
  resourceVersion: "4711"
  uid: 6f1d4c1e-8b1a-4d7e-9a55-2b2f7c1f0a01
spec:
  finalizers:
  - kubernetes
status:
  phase: Active
"#;

pub const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2024-05-02T10:12:00Z"
  generateName: web-7d9c6b5f4-
  labels:
    app: web
    pod-template-hash: 7d9c6b5f4
  name: web-7d9c6b5f4-x2x8q
  namespace: shop
  ownerReferences:
  - apiVersion: apps/v1
    blockOwnerDeletion: true
    controller: true
    kind: ReplicaSet
    name: web-7d9c6b5f4
    uid: 0b8c3a8e-1111-4c4c-8e8e-222233334444
  resourceVersion: "5120"
  uid: 3c1f2a9e-7b6d-4e2f-9a1b-5d4c3b2a1f00
spec:
  containers:
  - image: nginx:1.27
    imagePullPolicy: IfNotPresent
    name: nginx
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
    resources: {}
  dnsPolicy: ClusterFirst
  nodeName: node-1
  restartPolicy: Always
  schedulerName: default-scheduler
  serviceAccount: web
  serviceAccountName: web
  terminationGracePeriodSeconds: 30
status:
  conditions:
  - lastProbeTime: null
    lastTransitionTime: "2024-05-02T10:12:03Z"
    status: "True"
    type: Ready
  containerStatuses:
  - containerID: containerd://abcdef
    image: docker.io/library/nginx:1.27
    name: nginx
    ready: true
    restartCount: 0
    started: true
    state:
      running:
        startedAt: "2024-05-02T10:12:02Z"
  hostIP: 172.18.0.2
  phase: Running
  podIP: 10.244.1.10
  podIPs:
  - ip: 10.244.1.10
  qosClass: BestEffort
  startTime: "2024-05-02T10:12:00Z"
"#;

pub const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
  creationTimestamp: "2024-05-02T10:12:00Z"
  labels:
    app: web
  name: web
  namespace: shop
  resourceVersion: "5001"
  uid: 9e9e9e9e-0000-4000-8000-000000000001
spec:
  clusterIP: 10.96.0.10
  clusterIPs:
  - 10.96.0.10
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
    appProtocol: http
  - name: metrics
    port: 9090
    protocol: TCP
    targetPort: 9091
  selector:
    app: web
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {}
"#;

pub const ENDPOINT_SLICE: &str = r#"
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.10
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-1
  targetRef:
    kind: Pod
    name: web-7d9c6b5f4-x2x8q
    namespace: shop
    uid: 3c1f2a9e-7b6d-4e2f-9a1b-5d4c3b2a1f00
  zone: zone-a
- addresses:
  - 10.244.2.11
  conditions:
    ready: false
    serving: true
    terminating: true
  nodeName: node-2
  targetRef:
    kind: Pod
    name: web-7d9c6b5f4-old
- addresses:
  - 10.244.2.12
  nodeName: node-2
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2024-05-02T10:12:03Z"
  generateName: web-
  generation: 7
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-abcde
  namespace: shop
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: web
    uid: 9e9e9e9e-0000-4000-8000-000000000001
  resourceVersion: "5130"
  uid: 1a2b3c4d-0000-4000-8000-000000000002
ports:
- name: http
  port: 8080
  protocol: TCP
  appProtocol: http
- name: metrics
  port: 9091
  protocol: TCP
"#;

/// Everything above as one multi-document file.
pub fn all() -> String {
    format!("{NAMESPACE}---{POD}---{SERVICE}---{ENDPOINT_SLICE}")
}

/// A minimal valid Namespace.
pub fn namespace(name: &str, enrolled: bool) -> String {
    let ann = if enrolled { "\n  annotations:\n    sluice.dev/mesh: enabled" } else { "" };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{ann}\n")
}

/// A minimal valid Pod.
pub fn pod(ns: &str, name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{name}\n\
         spec:\n  nodeName: {node}\nstatus:\n  podIP: {ip}\n  phase: Running\n"
    )
}

/// Istio's "allow-nothing" example as `kubectl get -o yaml` prints it: an ALLOW policy (the
/// default action) without rules, for every pod of the namespace.
pub const ALLOW_NOTHING: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"annotations":{},"name":"allow-nothing","namespace":"shop"},"spec":{}}
  creationTimestamp: "2024-05-03T08:00:00Z"
  generation: 1
  name: allow-nothing
  namespace: shop
  resourceVersion: "7001"
  uid: 5b0c6f0e-1234-4abc-9def-000000000001
spec: {}
"#;

/// Istio's "deny requests from the dev namespace" example, at the older v1beta1 version.
pub const DENY_FROM_NAMESPACE: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-from-dev
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
"#;

/// Istio's "allow by principal and port" shape: one service account, two ports.
pub const ALLOW_PRINCIPAL_PORT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-viewer
  namespace: shop
  labels:
    team: storefront
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
    to:
    - operation:
        ports: ["8080", "9091"]
"#;

/// A namespace with a peer authentication mode.
pub fn namespace_peer_auth(name: &str, mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations:\n    \
         sluice.dev/mesh: enabled\n    sluice.dev/peer-authentication: {mode}\n"
    )
}

/// A minimal AuthorizationPolicy with the given spec (indented two spaces, or `{}`).
pub fn policy(ns: &str, name: &str, spec: &str) -> String {
    let spec = if spec.trim() == "{}" { " {}\n".to_owned() } else { format!("\n{spec}") };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\nspec:{spec}"
    )
}
