//! The criterion micro-benchmarks of `proxy/benches/hotpaths.rs`, run through cargo and read
//! back from criterion's estimates.

use std::{fs, path::Path};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// (criterion id, what it measures).
pub const BENCHES: &[(&str, &str)] = &[
    ("balancer/pick_100_endpoints", "L4: round-robin pick, 100 endpoints"),
    ("balancer/resolve_and_pick_100_endpoints", "L4: Service resolve + pick, 100 endpoints"),
    ("service_lookup/hit_1000_services", "ClusterIP:port lookup, 1000 Services (hit)"),
    ("service_lookup/miss_1000_services", "ClusterIP:port lookup, 1000 Services (miss: pod IP)"),
    ("orig_dst/conn_key_v4", "original-destination map key, IPv4"),
    ("orig_dst/conn_key_v4_mapped_v6", "original-destination map key, v4-mapped IPv6"),
    ("detect/http1_request_line", "protocol detection: HTTP/1.1 request line"),
    ("detect/h2_preface", "protocol detection: HTTP/2 preface (h2c, gRPC)"),
    ("detect/tls_client_hello", "protocol detection: TLS ClientHello (opaque)"),
    ("route_match/near_end_1000_routes", "HTTPRoute match, 1000 routes, hit on the 991st"),
    ("route_match/no_match_1000_routes", "HTTPRoute match, 1000 routes, no match"),
    ("l7_balancer/p2c_ewma_pick_complete_100_endpoints", "L7: P2C peak-EWMA pick + complete, 100 endpoints"),
];

pub fn run(out_dir: &Path, quick: bool) -> Result<Value> {
    let home = out_dir.join("criterion");
    let (warm, measure) = if quick { ("0.5", "1") } else { ("1", "3") };
    let status = crate::cargo()
        .args([
            "bench",
            "--package",
            "sluice",
            "--bench",
            "hotpaths",
            "--",
            "--warm-up-time",
            warm,
            "--measurement-time",
            measure,
        ])
        .env("CRITERION_HOME", &home)
        .status()
        .context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench -p sluice --bench hotpaths failed ({status})");
    }
    let mut rows = Vec::new();
    for (id, what) in BENCHES {
        let file = home.join(id).join("new/estimates.json");
        let v: Value = serde_json::from_str(
            &fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
        )?;
        rows.push(json!({
            "id": id,
            "what": what,
            "mean_ns": v["mean"]["point_estimate"].as_f64().map(|x| (x * 100.0).round() / 100.0),
            "median_ns": v["median"]["point_estimate"].as_f64().map(|x| (x * 100.0).round() / 100.0),
        }));
    }
    Ok(json!({"benches": rows}))
}
