//! DestinationRule: parsing (Istio's schema, rejections with field paths), Istio's merge of
//! top-level, port-level and subset policies, and the index (subsets by pod labels, which rule
//! applies to which client, Maglev tables per endpoint set).

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::{Model, Object};

fn rule(yaml: &str) -> DestinationRule {
    match parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")).as_slice() {
        [Object::DestinationRule(r)] => (**r).clone(),
        other => panic!("not one DestinationRule: {other:?}"),
    }
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("accepted: {o:?}"),
        Err(e) => e.to_string(),
    }
}

/// A DestinationRule `shop/dr` with `spec` (indented by two spaces).
fn dr(spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: dr\n  namespace: shop\nspec:\n{spec}")
}

const BOOKINFO_LIKE: &str = r#"apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRequestsPerConnection: 5, maxRetries: 3, idleTimeout: 2s}
    outlierDetection:
      consecutive5xxErrors: 7
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 50
    portLevelSettings:
    - port: {number: 9443}
      tls: {mode: SIMPLE, sni: reviews.example.com}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: user, ttl: 0s, path: /}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
"#;

#[test]
fn parses_what_istio_users_write() {
    let r = rule(BOOKINFO_LIKE);
    assert_eq!(r.host, "reviews.shop.svc.cluster.local");
    let top = r.traffic_policy.as_ref().unwrap();
    assert_eq!(top.base.load_balancer, Some(LoadBalancer::LeastRequest));
    let pool = top.base.connection_pool.as_ref().unwrap();
    assert_eq!(pool.max_connections, Some(100));
    assert_eq!(pool.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(pool.max_pending_requests, Some(10));
    assert_eq!(pool.max_requests, Some(50));
    assert_eq!(pool.max_requests_per_connection, Some(5));
    assert_eq!(pool.max_retries, Some(3));
    assert_eq!(pool.idle_timeout, Some(Duration::from_secs(2)));
    let od = top.base.outlier_detection.unwrap();
    assert_eq!((od.consecutive_5xx, od.consecutive_gateway_errors), (7, 0));
    assert_eq!((od.interval, od.base_ejection_time), (Duration::from_secs(5), Duration::from_secs(60)));
    assert_eq!((od.max_ejection_percent, od.min_health_percent), (50, 0));
    assert_eq!(top.port_level[0].0, 9443);
    assert_eq!(top.port_level[0].1.tls.as_ref().unwrap().mode, TlsMode::Simple);
    assert_eq!(r.subsets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["v1", "v2", "v3"]);
    let v2 = r.subsets[1].traffic_policy.as_ref().unwrap();
    assert_eq!(
        v2.base.load_balancer,
        Some(LoadBalancer::ConsistentHash(ConsistentHash {
            key: HashKey::Cookie { name: "user".into(), path: Some("/".into()), ttl: Some(Duration::ZERO) },
            table_size: None,
        }))
    );
    // Every served apiVersion, and the outlier defaults of Istio.
    for v in ["v1", "v1beta1", "v1alpha3"] {
        let y = format!("apiVersion: networking.istio.io/{v}\nkind: DestinationRule\nmetadata: {{name: d}}\nspec:\n  host: ratings.prod.svc.cluster.local\n  trafficPolicy: {{outlierDetection: {{consecutiveErrors: 2}}}}\n");
        let r = rule(&y);
        assert_eq!(r.namespace, "default");
        let od = r.traffic_policy.unwrap().base.outlier_detection.unwrap();
        // The deprecated consecutiveErrors is a gateway-error count; 5xx stays at its default.
        assert_eq!((od.consecutive_5xx, od.consecutive_gateway_errors, od.max_ejection_percent), (5, 2, 10));
    }
}

#[test]
fn each_hash_key_and_load_balancer() {
    let lb = |body: &str| {
        rule(&dr(&format!("  host: web\n  trafficPolicy:\n    loadBalancer: {body}\n")))
            .traffic_policy
            .unwrap()
            .base
            .load_balancer
            .unwrap()
    };
    assert_eq!(lb("{simple: ROUND_ROBIN}"), LoadBalancer::RoundRobin);
    assert_eq!(lb("{simple: LEAST_CONN}"), LoadBalancer::LeastRequest);
    assert_eq!(lb("{simple: PASSTHROUGH}"), LoadBalancer::Passthrough);
    assert_eq!(lb("{simple: UNSPECIFIED}"), LoadBalancer::Default);
    let key = |body: &str| match lb(&format!("{{consistentHash: {body}}}")) {
        LoadBalancer::ConsistentHash(ch) => (ch.key, ch.table_size),
        other => panic!("{other:?}"),
    };
    assert_eq!(key("{httpHeaderName: X-User}"), (HashKey::Header { name: "x-user".into() }, None));
    assert_eq!(key("{useSourceIp: true}"), (HashKey::SourceIp, None));
    assert_eq!(
        key("{httpQueryParameterName: u, maglev: {tableSize: 1031}}"),
        (HashKey::QueryParameter { name: "u".into() }, Some(1031))
    );
    // A ring size is accepted (sluice's table is Maglev whatever the algorithm asked).
    assert_eq!(key("{useSourceIp: true, ringHash: {minimumRingSize: 1024}}").0, HashKey::SourceIp);
}

#[test]
fn what_sluice_does_not_implement_is_rejected_with_its_path() {
    let cases = [
        ("  host: web\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, foo: 1}}\n", "spec.trafficPolicy.loadBalancer.foo", "unknown field"),
        ("  host: web\n  trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}}\n", "spec.trafficPolicy.loadBalancer.localityLbSetting", "locality"),
        ("  host: web\n  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n", "spec.trafficPolicy.loadBalancer", "not both"),
        ("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}\n", "spec.trafficPolicy.loadBalancer.consistentHash", "only one"),
        ("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {maglev: {tableSize: 1000}, useSourceIp: true}}}\n", "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize", "prime"),
        ("  host: web\n  trafficPolicy: {tls: {mode: SIMPLE, credentialName: web-ca}}\n", "spec.trafficPolicy.tls.credentialName", "Secrets"),
        ("  host: web\n  trafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /etc/c.pem}}\n", "spec.trafficPolicy.tls.privateKey", "missing"),
        ("  host: web\n  trafficPolicy: {tls: {mode: SIMPLE, caCertificates: ca.pem}}\n", "spec.trafficPolicy.tls.caCertificates", "absolute"),
        ("  host: web\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, subjectAltNames: [web.example.com]}}\n", "spec.trafficPolicy.tls.subjectAltNames[0]", "SPIFFE"),
        ("  host: web\n  trafficPolicy: {tls: {mode: STRICT}}\n", "spec.trafficPolicy.tls.mode", "not one of"),
        ("  host: web\n  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 10s}}}}\n", "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive", "keepalive"),
        ("  host: web\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}\n", "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy", "HTTP version"),
        ("  host: web\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: -1}}}\n", "spec.trafficPolicy.connectionPool.http.http2MaxRequests", "count"),
        ("  host: web\n  trafficPolicy: {outlierDetection: {interval: 5}}\n", "spec.trafficPolicy.outlierDetection.interval", "invalid type"),
        ("  host: web\n  trafficPolicy: {outlierDetection: {baseEjectionTime: soon}}\n", "spec.trafficPolicy.outlierDetection.baseEjectionTime", "duration"),
        ("  host: web\n  trafficPolicy: {proxyProtocol: {version: V1}}\n", "spec.trafficPolicy.proxyProtocol", "PROXY protocol"),
        ("  host: web\n  subsets: [{name: v1}, {name: v1}]\n", "spec.subsets[1].name", "twice"),
        ("  host: web\n  subsets: [{labels: {a: b}}]\n", "spec.subsets[0].name", "missing"),
        ("  host: web\n  subsets: [{name: v1, trafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}}]\n", "spec.subsets[0].trafficPolicy.portLevelSettings[1].port.number", "twice"),
        ("  host: web\n  subsets: [{name: v1, labels: {version: 1}}]\n", "spec.subsets[0].labels.version", "invalid type"),
        ("  host: 'web.*.local'\n", "spec.host", "host name"),
        ("  trafficPolicy: {}\n", "spec.host", "missing"),
        ("  host: web\n  exportTo: [\"Bad_Ns\"]\n", "spec.exportTo[0]", "namespace"),
    ];
    for (spec, path, why) in cases {
        let e = err(&dr(spec));
        assert!(e.contains(path), "{spec}: {e}");
        assert!(e.to_lowercase().contains(&why.to_lowercase()), "{spec}: {e}");
    }
}

#[test]
fn merge_follows_istio() {
    let r = rule(&dr(r#"  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 10}}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: a
    labels: {v: a}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 5}}
  - name: b
    labels: {v: b}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
      portLevelSettings:
      - port: {number: 80}
        outlierDetection: {consecutive5xxErrors: 1}
"#));
    let top = r.traffic_policy.as_ref();
    let sub = |i: usize| r.subsets[i].traffic_policy.as_ref();
    // The top level on a port without port-level settings.
    let p = merge(top, None, Some(80));
    assert_eq!(p.load_balancer, Some(LoadBalancer::RoundRobin));
    assert_eq!(p.connection_pool.as_ref().unwrap().max_connections, Some(10));
    // Port-level settings replace the whole top level: nothing is inherited.
    let p = merge(top, None, Some(8080));
    assert_eq!(p, PolicyLevel { load_balancer: Some(LoadBalancer::Random), ..Default::default() });
    // A subset overrides field by field: its pool replaces the top pool, the LB and TLS stay.
    let p = merge(top, sub(0), Some(80));
    assert_eq!(p.load_balancer, Some(LoadBalancer::RoundRobin));
    assert_eq!(
        p.connection_pool.as_ref().unwrap(),
        &ConnectionPool { max_requests: Some(5), ..Default::default() }
    );
    assert_eq!(p.tls.as_ref().unwrap().mode, TlsMode::IstioMutual);
    // ...on top of the top level's port-level settings for that port.
    let p = merge(top, sub(0), Some(8080));
    assert_eq!(p.load_balancer, Some(LoadBalancer::Random));
    assert!(p.tls.is_none());
    // A subset's own port-level settings replace everything for that port.
    let p = merge(top, sub(1), Some(80));
    assert_eq!(p.load_balancer, None);
    assert_eq!(p.outlier_detection.unwrap().consecutive_5xx, 1);
    assert!(p.connection_pool.is_none() && p.tls.is_none());
    let p = merge(top, sub(1), Some(9090));
    assert_eq!(p.load_balancer, Some(LoadBalancer::LeastRequest));
    assert_eq!(p.connection_pool.as_ref().unwrap().max_connections, Some(10));
}

/// Namespaces `shop` (the Service reviews with three versions, two pods of v1) and `front`,
/// plus `rules` (YAML documents).
fn model(rules: &str) -> Model {
    let mut y = String::new();
    for ns in ["shop", "front", "istio-system"] {
        y += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
    }
    let pods = [("r1a", "v1", 11), ("r1b", "v1", 12), ("r2", "v2", 13), ("r3", "v3", 14)];
    for (name, version, ip) in pods {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}, labels: {{app: reviews, version: {version}}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.244.1.{ip}, phase: Running}}\n"
        );
    }
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 9080}, {name: admin, port: 9090}]\n";
    y += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}\naddressType: IPv4\nports: [{name: http, port: 9080}, {name: admin, port: 9090}]\nendpoints:\n";
    for (_, _, ip) in pods {
        y += &format!("- addresses: [10.244.1.{ip}]\n");
    }
    y += rules;
    Model::from_manifest(&y, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn ep(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([10, 244, 1, last], port))
}

const CLIENT_FRONT: Client<'static> = Client { namespace: "front", labels: None };

#[test]
fn subsets_select_endpoints_by_pod_labels() {
    let m = model(&format!("---\n{BOOKINFO_LIKE}"));
    let idx = m.destination_rule_index();
    let v1 = idx.destination(CLIENT_FRONT, "shop", "reviews", 9080, Some("v1")).unwrap().unwrap();
    assert_eq!(v1.endpoints_of(AddressType::IPv4).0.as_ref(), [ep(11, 9080), ep(12, 9080)]);
    assert_eq!(v1.subset.as_deref(), Some("v1"));
    let v3 = idx.destination(CLIENT_FRONT, "shop", "reviews", 9090, Some("v3")).unwrap().unwrap();
    assert_eq!(v3.endpoints_of(AddressType::IPv4).0.as_ref(), [ep(14, 9090)]);
    assert_eq!(v3.policy.load_balancer, Some(LoadBalancer::Random));
    // No subset: every endpoint, the top-level policy.
    let all = idx.destination(CLIENT_FRONT, "shop", "reviews", 9080, None).unwrap().unwrap();
    assert_eq!(all.endpoints_of(AddressType::IPv4).0.len(), 4);
    assert_eq!(all.policy.load_balancer, Some(LoadBalancer::LeastRequest));
    // An unknown subset says which exist.
    let e = idx.destination(CLIENT_FRONT, "shop", "reviews", 9080, Some("v9")).unwrap().unwrap_err();
    assert!(e.contains("no subset \"v9\"") && e.contains("v1, v2, v3"), "{e}");
    // The contract's resolve_subset: labels and the merged policy.
    let sel = resolve_subset(&m, "shop", "reviews", "v2").unwrap();
    assert_eq!(sel.labels.get("version").map(String::as_str), Some("v2"));
    assert!(matches!(sel.policy.load_balancer, Some(LoadBalancer::ConsistentHash(_))));
    assert_eq!(sel.rule, "shop/reviews");
    assert!(resolve_subset(&m, "shop", "ratings", "v1").unwrap_err().contains("no DestinationRule"));
    // A Service without a rule: nothing applies, and a subset is an error.
    assert!(idx.destination(CLIENT_FRONT, "shop", "nothing", 80, None).is_none());
    assert!(idx.destination(CLIENT_FRONT, "shop", "nothing", 80, Some("v1")).unwrap().is_err());
}

#[test]
fn consistent_hash_destinations_get_a_maglev_table_per_endpoint_set() {
    let m = model(&format!("---\n{BOOKINFO_LIKE}"));
    let idx = m.destination_rule_index();
    let v2 = idx.destination(CLIENT_FRONT, "shop", "reviews", 9080, Some("v2")).unwrap().unwrap();
    let (eps, table) = v2.endpoints_of(AddressType::IPv4);
    let table = table.expect("a table for the hashing subset");
    assert!(std::sync::Arc::ptr_eq(table.endpoints(), eps), "built over exactly the endpoints handed out");
    let v1 = idx.destination(CLIENT_FRONT, "shop", "reviews", 9080, Some("v1")).unwrap().unwrap();
    assert!(v1.endpoints_of(AddressType::IPv4).1.is_none(), "no table where nothing hashes");
    // One table per (endpoint set, size): the v2 subset on its two ports.
    assert_eq!(idx.stats.maglev_tables, 2);
    assert_eq!(idx.stats.tables_over_budget, 0);
}

#[test]
fn which_rule_applies_to_which_client() {
    let rules = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: owner, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: wildcard, namespace: shop}
spec:
  host: "*.shop.svc.cluster.local"
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: private, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  exportTo: ["."]
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: consumer, namespace: front}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: canary-clients, namespace: front}
spec:
  host: reviews.shop.svc.cluster.local
  workloadSelector: {matchLabels: {canary: "true"}}
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-default, namespace: istio-system}
spec:
  host: "*"
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
"#;
    let m = model(rules);
    let idx = m.destination_rule_index();
    assert!(idx.needs_labels());
    let lb = |client: Client<'_>| {
        let d = idx.destination(client, "shop", "reviews", 9080, None).unwrap().unwrap();
        (d.rule.to_string(), d.policy.load_balancer.clone())
    };
    // The client's own namespace first.
    assert_eq!(lb(CLIENT_FRONT), ("front/consumer".into(), Some(LoadBalancer::LeastRequest)));
    // A rule with a workloadSelector first, for the clients it selects.
    let canary: Labels = [("canary".to_string(), "true".to_string())].into();
    let d = lb(Client { namespace: "front", labels: Some(&canary) });
    assert_eq!(d.0, "front/canary-clients");
    // In the Service's namespace: the exact host beats the wildcard; of two exact hosts the
    // oldest wins (no timestamp counts as newest); an exportTo "." rule only for its namespace.
    assert_eq!(lb(Client { namespace: "shop", labels: None }).0, "shop/owner");
    // Another namespace sees the Service's namespace's exported rules.
    assert_eq!(lb(Client { namespace: "elsewhere", labels: None }).0, "shop/owner");
    // The root namespace's rule for what no other rule names.
    let m2 = model(&rules.replace("host: reviews\n", "host: ratings\n"));
    let idx2 = m2.destination_rule_index();
    let d = idx2
        .destination(Client { namespace: "other", labels: None }, "shop", "reviews", 9080, None)
        .unwrap()
        .unwrap();
    // shop/wildcard (the Service's namespace) beats the root namespace for that client.
    assert_eq!(&*d.rule, "shop/wildcard");
    let only_root = model(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  host: \"*\"\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}\n",
    );
    let d = only_root
        .destination_rule_index()
        .destination(CLIENT_FRONT, "shop", "reviews", 9080, None)
        .unwrap()
        .unwrap();
    assert_eq!(d.policy.connection_pool.as_ref().unwrap().max_connections, Some(7));
    // A rule of an unrelated namespace never applies.
    let unrelated = model(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x, namespace: front}\nspec:\n  host: reviews.shop.svc.cluster.local\n",
    );
    assert!(unrelated
        .destination_rule_index()
        .destination(Client { namespace: "third", labels: None }, "shop", "reviews", 9080, None)
        .is_none());
}

#[test]
fn the_table_budget_is_bounded_and_counted() {
    let mut tables = Tables::default();
    let set = |i: u8| -> std::sync::Arc<[SocketAddr]> { vec![ep(i, 80), ep(i.wrapping_add(100), 80)].into() };
    let per = crate::l7::maglev::DEFAULT_TABLE_SIZE as usize;
    let fit = MAX_TABLE_SLOTS / per;
    for i in 0..fit {
        assert!(tables.get(&set(i as u8), None).is_some(), "table {i} of {fit}");
    }
    assert_eq!(tables.over_budget, 0);
    // The same set again is the same table, however many ask.
    let again = tables.get(&set(0), None).unwrap();
    assert!(std::sync::Arc::ptr_eq(&again, &tables.get(&set(0), None).unwrap()));
    // Past the budget: no table, counted; a smaller table that still fits is built.
    assert!(tables.get(&set(200), None).is_none());
    assert_eq!(tables.over_budget, 1);
    assert_eq!(tables.slots, fit * per);
}
