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
//!
//! Not yet benchmarked because they do not exist yet: protocol detection (HTTP/1.1, HTTP/2,
//! opaque TCP) and route matching with 1000 routes (HTTPRoute); add them here with L7.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use sluice::{
    discovery::{Format, Model},
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

criterion_group!(benches, balancer, service_lookup, orig_dst);
criterion_main!(benches);
