//! Istio's resources as its users write them (issue 14: "accepted as they are"): the shapes of
//! Istio's documentation and tasks, in our own words: every apiVersion Istio serves
//! (`v1`, `v1beta1`, `v1alpha3`), `exportTo: ["."]`, `gateways: [mesh]`, fractional durations,
//! `portLevelSettings`, `mtls: {}`, `selector.matchLabels`, percentages as `{value: ...}`, and
//! the allow-nothing `spec: {}`. Each document must parse alone, and all of them together
//! must make one model (the semantic checks across resources pass too).

use crate::discovery::manifest::{parse, Format};
use crate::discovery::*;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo, labels: {app: reviews, service: reviews}}
spec:
  ports:
  - {port: 9080, name: http}
  selector: {app: reviews}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec:
  ports:
  - {port: 9080, name: http}
  selector: {app: ratings}
---
apiVersion: v1
kind: Service
metadata: {name: mongodb, namespace: bookinfo}
spec:
  ports:
  - {port: 27017, name: mongo}
  selector: {app: mongodb}
"#;

/// One document per shape; the comment says which habit of Istio users it stands for.
const AS_WRITTEN: &[(&str, &str)] = &[
    (
        "VirtualService v1alpha3, gateways: [mesh], exportTo: [.], 0.5s timeout, retries, fault, mirror",
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts:
  - reviews
  gateways:
  - mesh
  exportTo:
  - "."
  http:
  - match:
    - headers:
        end-user:
          exact: jason
      uri:
        prefix: /reviews
      ignoreUriCase: true
    route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 90
    - destination:
        host: reviews.bookinfo.svc.cluster.local
        subset: v3
        port:
          number: 9080
      weight: 10
    mirror:
      host: reviews
      subset: v2
    mirrorPercentage:
      value: 50.0
    headers:
      request:
        set:
          x-canary: "false"
      response:
        remove:
        - x-envoy-upstream-service-time
"#,
    ),
    (
        "VirtualService v1beta1: fault delay and abort with percentage.value",
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: ratings
  namespace: bookinfo
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
      abort:
        percentage:
          value: 10
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#,
    ),
    (
        "VirtualService v1: tcp route with weights and a port match",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: mongodb
  namespace: bookinfo
spec:
  hosts:
  - mongodb.bookinfo.svc.cluster.local
  tcp:
  - match:
    - port: 27017
    route:
    - destination:
        host: mongodb.bookinfo.svc.cluster.local
        port:
          number: 27017
      weight: 100
"#,
    ),
    (
        "DestinationRule v1beta1: top-level policy, portLevelSettings, subsets with their own policy, exportTo: [.]",
        r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  exportTo:
  - "."
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 1
        http2MaxRequests: 1000
        maxRequestsPerConnection: 1
        maxRetries: 3
        idleTimeout: 1.5s
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 3
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 100
      minHealthPercent: 0
    portLevelSettings:
    - port:
        number: 9080
      loadBalancer:
        simple: ROUND_ROBIN
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: RANDOM
  - name: v3
    labels:
      version: v3
"#,
    ),
    (
        "DestinationRule v1alpha3: consistent hash on a cookie with a ttl",
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: ratings
  namespace: bookinfo
spec:
  host: ratings.bookinfo.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: user
          ttl: 0.5s
  subsets:
  - name: v1
    labels:
      version: v1
"#,
    ),
    (
        "PeerAuthentication v1beta1: mesh-wide STRICT in istio-system",
        r#"
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"#,
    ),
    (
        "PeerAuthentication v1: selector.matchLabels, mtls: {} (inherit), portLevelMtls",
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: ratings
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: ratings
  mtls: {}
  portLevelMtls:
    9080:
      mode: DISABLE
"#,
    ),
    (
        "AuthorizationPolicy v1beta1: allow-nothing spec: {}",
        r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: bookinfo
spec: {}
"#,
    ),
    (
        "AuthorizationPolicy v1: selector.matchLabels, principals, GET on paths, a claim condition",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: productpage-viewer
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/productpage", "/api/v1/products*", "*/health"]
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"#,
    ),
    (
        "AuthorizationPolicy v1: allow-all rules: [{}] and a DENY on a namespace",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-dev
  namespace: bookinfo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["bookinfo"]
    to:
    - operation:
        methods: ["POST"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: istio-system
spec:
  rules:
  - {}
"#,
    ),
    (
        "RequestAuthentication v1beta1: selector.matchLabels, jwksUri, forwardOriginalToken",
        r#"
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: bookinfo
spec:
  selector:
    matchLabels:
      app: productpage
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "https://issuer.example/jwks.json"
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
"#,
    ),
];

#[test]
fn every_shape_is_accepted_alone() {
    let mut failed = Vec::new();
    for (what, yaml) in AS_WRITTEN {
        match parse(yaml, Format::Yaml) {
            Ok(objects) => assert!(!objects.is_empty(), "{what}: nothing parsed"),
            Err(e) => failed.push(format!("{what}:\n    {e}")),
        }
    }
    assert!(failed.is_empty(), "rejected as written:\n  {}", failed.join("\n  "));
}

#[test]
fn together_they_make_one_model() {
    let mut docs = vec![SERVICES.to_owned()];
    docs.extend(AS_WRITTEN.iter().map(|(_, y)| y.to_string()));
    let m = Model::from_manifest(&docs.join("---\n"), Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.destination_rules().count(), 2);
    // The subsets the routes name are the ones the rules define (a semantic check across kinds).
    let index = m.destination_rule_index();
    let in_force = index.in_force("bookinfo", "reviews");
    assert_eq!(
        in_force,
        [(
            "clients in namespace bookinfo".to_owned(),
            "bookinfo/reviews".to_owned(),
            vec!["v1".into(), "v2".into(), "v3".into()]
        )],
        "exportTo: [.] keeps the rule to bookinfo's clients"
    );
}
