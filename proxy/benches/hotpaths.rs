//! Micro-benchmarks of the data path's per-connection work (criterion). Run them with
//! `cargo bench -p sluice --bench hotpaths`, or as part of `cargo xtask bench` (see
//! docs/benchmarks.md).
//!
//! - `balancer/pick_100_endpoints`: round-robin pick among 100 ready endpoints of one Service
//!   port (`routing::RoundRobin::pick`), and `balancer/resolve_and_pick_100_endpoints`, the
//!   whole per-connection routing step (`routing::resolve` + pick).
//! - `service_lookup/hit_1000_services` and `miss_1000_services`: `Model::service_for` in a
//!   snapshot of 1000 Services (ClusterIP:port → Service port and endpoints), for a ClusterIP
//!   and for a pod IP (not a Service: forwarded as dialled).
//! - `orig_dst/conn_key_v4` and `conn_key_v4_mapped_v6`: building the key under which the
//!   kernel recorded a connection's original destination (`redirect::conn_key`). The map
//!   lookup itself is a `bpf()` syscall (needs root and the loaded programs); its cost is in
//!   the end-to-end figures of `cargo xtask bench` and the callgrind profile.
//! - `detect/*`: protocol detection on a captured connection's first bytes
//!   (`l7::detect::classify_prefix`, what sniffing decides once bytes are in): an HTTP/1.1
//!   request line, the HTTP/2 connection preface (h2c, gRPC), and a TLS ClientHello (opaque).
//! - `route_match/*_1000_routes`: `RouteTable::select` in the table of one Service port with
//!   1000 HTTPRoutes (a PathPrefix and a header match each, all of equal precedence so the
//!   table keeps their order), for a request that matches the 991st entry and for one that
//!   matches none (walks all 1000).
//! - `l7_balancer/p2c_ewma_pick_complete_100_endpoints`: the per-request pick of the L7 path
//!   (`l7::Balancer` with `LbPolicy::P2cEwma`: two random candidates, their peak-EWMA costs)
//!   and completing the request (feeding its latency back), among 100 endpoints.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};
use sluice::{
    discovery::{
        route::{
            BackendRef, HeaderMatch, PathMatch, Route, RouteKind, RouteMatch, RouteRule, RouteTimeouts,
            ValueMatch,
        },
        route_table::{RequestParts, RouteTable},
        Format, Model,
    },
    l7::{
        detect::{classify_prefix, Protocol, H2_PREFACE},
        Balancer, EwmaConfig, LbPolicy,
    },
    redirect::conn_key,
    routing::{self, RoundRobin},
};

/// A Service `ns-<i>/svc-<i>` on ClusterIP 10.96.x.y:80 with `endpoints` ready pods.
fn service_docs(i: usize, endpoints: usize) -> [Value; 2] {
    let ip = Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8);
    let (ns, name) = (format!("ns-{i}"), format!("svc-{i}"));
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    });
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            json!({
                "addresses": [format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1)],
                "conditions": {"ready": true},
            })
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-a"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    });
    [service, slice]
}

fn model(services: usize, endpoints_each: usize) -> Model {
    let items: Vec<Value> = (0..services).flat_map(|i| service_docs(i, endpoints_each)).collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    Model::from_manifest(&list.to_string(), Format::Json).expect("valid generated manifest")
}

fn vip(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)), 80)
}

fn balancer(c: &mut Criterion) {
    let m = model(1, 100);
    let target = routing::resolve(&m, vip(0));
    assert_eq!(target.endpoints.len(), 100, "the generated Service has 100 ready endpoints");
    let rr = RoundRobin::default();
    let mut g = c.benchmark_group("balancer");
    g.bench_function("pick_100_endpoints", |b| b.iter(|| rr.pick(black_box(&target))));
    g.bench_function("resolve_and_pick_100_endpoints", |b| {
        b.iter(|| {
            let t = routing::resolve(black_box(&m), black_box(vip(0)));
            rr.pick(&t)
        })
    });
    g.finish();
}

fn service_lookup(c: &mut Criterion) {
    let m = model(1000, 3);
    let hit = vip(777);
    assert!(m.service_for(hit.ip(), hit.port()).is_some(), "service 777 is indexed");
    let miss: SocketAddr = "10.244.1.10:8080".parse().expect("literal");
    let mut g = c.benchmark_group("service_lookup");
    g.bench_function("hit_1000_services", |b| {
        b.iter(|| black_box(&m).service_for(black_box(hit.ip()), black_box(hit.port())).is_some())
    });
    g.bench_function("miss_1000_services", |b| {
        b.iter(|| black_box(&m).service_for(black_box(miss.ip()), black_box(miss.port())).is_some())
    });
    g.finish();
}

fn orig_dst(c: &mut Criterion) {
    let v4: SocketAddr = "127.0.0.1:43210".parse().expect("literal");
    let mapped: SocketAddr = "[::ffff:127.0.0.1]:43210".parse().expect("literal");
    let mut g = c.benchmark_group("orig_dst");
    g.bench_function("conn_key_v4", |b| b.iter(|| conn_key(black_box(7), black_box(v4))));
    g.bench_function("conn_key_v4_mapped_v6", |b| b.iter(|| conn_key(black_box(7), black_box(mapped))));
    g.finish();
}

/// The first bytes of a TLS 1.3 ClientHello (record header, handshake header, version, random).
const CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0xf8, 0x01, 0x00, 0x00, 0xf4, 0x03, 0x03, 0x5b, 0x2c, 0x1e, 0x84, 0x0a, 0x9d,
    0x3f, 0x71, 0x22, 0x6c, 0x0e, 0xb4, 0x90, 0x17, 0x3d, 0xa8, 0x4e, 0x02, 0xc1, 0x66, 0x5f, 0x93, 0x28,
    0x7b, 0xe0,
];

fn detect(c: &mut Criterion) {
    let http1: &[u8] = b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: shop.example:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n";
    // The preface and the client's first SETTINGS frame, as they arrive together.
    let mut h2 = H2_PREFACE.to_vec();
    h2.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
    assert_eq!(classify_prefix(http1), Some(Protocol::Http1));
    assert_eq!(classify_prefix(&h2), Some(Protocol::Http2));
    assert_eq!(classify_prefix(CLIENT_HELLO), Some(Protocol::Opaque));
    let mut g = c.benchmark_group("detect");
    g.bench_function("http1_request_line", |b| b.iter(|| classify_prefix(black_box(http1))));
    g.bench_function("h2_preface", |b| b.iter(|| classify_prefix(black_box(&h2))));
    g.bench_function("tls_client_hello", |b| b.iter(|| classify_prefix(black_box(CLIENT_HELLO))));
    g.finish();
}

/// HTTPRoute `ns/route-<i>`: one rule, `PathPrefix /api/v1/svc-<i>` and header
/// `x-tenant: tenant-<i>`, one backend.
fn http_route(i: usize) -> Arc<Route> {
    Arc::new(Route {
        kind: RouteKind::Http,
        namespace: "ns".into(),
        name: format!("route-{i:04}"),
        created: None,
        parents: vec![],
        hostnames: vec![],
        rules: vec![RouteRule {
            name: None,
            matches: vec![RouteMatch {
                path: Some(PathMatch::PathPrefix(format!("/api/v1/svc-{i:04}"))),
                headers: vec![HeaderMatch {
                    name: "x-tenant".into(),
                    value: ValueMatch::Exact(format!("tenant-{i:04}")),
                }],
                ..RouteMatch::default()
            }],
            filters: vec![],
            backends: vec![BackendRef {
                namespace: "ns".into(),
                name: format!("svc-{i:04}"),
                port: Some(80),
                weight: 1,
                filters: vec![],
                invalid: None,
            }],
            timeouts: RouteTimeouts::default(),
            retry: None,
        }],
    })
}

fn route_match(c: &mut Criterion) {
    let routes: Vec<Arc<Route>> = (0..1000).map(http_route).collect();
    let table = RouteTable::build(&routes);
    assert_eq!(table.len(), 1000);
    let get = Method::GET;
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("tenant-0990"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let near_end = RequestParts {
        method: &get,
        path: "/api/v1/svc-0990/items",
        query: Some("page=2"),
        headers: &headers,
    };
    let nothing = RequestParts { method: &get, path: "/api/v2/other", query: None, headers: &headers };
    // Equal precedence everywhere: the table keeps name order, so route 990 is the 991st entry.
    let hit = table.select(&near_end, false).expect("route-0990 matches");
    assert_eq!(hit.route.name, "route-0990");
    assert!(table.select(&nothing, false).is_none());
    let mut g = c.benchmark_group("route_match");
    g.bench_function("near_end_1000_routes", |b| {
        b.iter(|| black_box(&table).select(black_box(&near_end), false).is_some())
    });
    g.bench_function("no_match_1000_routes", |b| {
        b.iter(|| black_box(&table).select(black_box(&nothing), false).is_some())
    });
    g.finish();
}

fn l7_balancer(c: &mut Criterion) {
    let endpoints: Vec<SocketAddr> = (0..100)
        .map(|i| SocketAddr::from(([10, 244, 1 + (i / 250) as u8, (i % 250 + 1) as u8], 8080)))
        .collect();
    let b = Balancer::new(LbPolicy::P2cEwma, EwmaConfig::default());
    // Every endpoint measured once, as in steady state (a fresh one is probed first).
    for ep in &endpoints {
        let (_, f) = b.pick(7, std::slice::from_ref(ep)).expect("one endpoint");
        f.complete(Instant::now());
    }
    let mut g = c.benchmark_group("l7_balancer");
    g.bench_function("p2c_ewma_pick_complete_100_endpoints", |bn| {
        bn.iter(|| {
            let (addr, in_flight) = b.pick(black_box(7), black_box(&endpoints)).expect("endpoints");
            in_flight.complete(Instant::now());
            addr
        })
    });
    g.finish();
}

criterion_group!(benches, balancer, service_lookup, orig_dst, detect, route_match, l7_balancer);
criterion_main!(benches);
