//! How a DestinationRule's merged policy lands on a plan: the connection pool on the circuit
//! breaker, outlier detection, the load balancer, the hash keys of a request, and a
//! TrafficPolicy on the same destination winning the groups it sets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::discovery::istio::destination_rule::{ConnectionPool, ConsistentHash};
use crate::discovery::traffic::PolicyTimeouts;

fn endpoints() -> Arc<[SocketAddr]> {
    (1..=4).map(|i| SocketAddr::from(([10, 244, 0, i], 8080))).collect::<Vec<_>>().into()
}

fn plan() -> Plan {
    Plan::simple("shop/web:80".into(), endpoints(), 7)
}

fn outlier(consecutive_5xx: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_errors: 0,
        consecutive_connect_failures: 0,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent: 50,
        min_health_percent: 0,
        split_local_origin: false,
    }
}

fn traffic_policy(
    breaker: Option<CircuitBreaker>,
    outlier: Option<OutlierDetection>,
    connect: Option<Duration>,
) -> Arc<TrafficPolicy> {
    Arc::new(TrafficPolicy {
        namespace: "shop".into(),
        name: "web".into(),
        created: None,
        targets: Vec::new(),
        timeouts: PolicyTimeouts { connect, ..PolicyTimeouts::default() },
        retries: None,
        outlier_detection: outlier,
        circuit_breaker: breaker,
        fault_injection: None,
        local_rate_limit: None,
        tls: None,
    })
}

fn pool_policy() -> PolicyLevel {
    PolicyLevel {
        connection_pool: Some(ConnectionPool {
            max_connections: Some(2),
            connect_timeout: Some(Duration::from_millis(1500)),
            max_pending_requests: Some(3),
            max_requests: Some(4),
            max_requests_per_connection: Some(5),
            max_retries: Some(6),
            idle_timeout: Some(Duration::from_secs(2)),
        }),
        outlier_detection: Some(outlier(3)),
        ..PolicyLevel::default()
    }
}

const PASSTHROUGH: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10)), 80);

#[test]
fn the_pool_maps_onto_the_circuit_breaker_and_connection_settings() {
    let mut p = plan();
    p.apply_rule_policy(&pool_policy(), None, PASSTHROUGH, |_| None);
    assert_eq!(
        p.breaker,
        Some(CircuitBreaker {
            max_connections: Some(2),
            max_pending_requests: Some(3),
            max_requests: Some(4),
            max_retries: Some(6),
            max_requests_per_connection: Some(5),
        })
    );
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(2)));
    assert_eq!(p.outlier, Some(outlier(3)));
    // A pool with only timeouts sets no breaker (no limit is not a limit of zero).
    let mut q = plan();
    let only_timeouts = PolicyLevel {
        connection_pool: Some(ConnectionPool {
            connect_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        }),
        ..PolicyLevel::default()
    };
    q.apply_rule_policy(&only_timeouts, None, PASSTHROUGH, |_| None);
    assert_eq!(q.breaker, None);
    assert_eq!(q.connect_timeout, Some(Duration::from_secs(1)));
}

#[test]
fn a_traffic_policy_wins_each_group_it_sets_and_only_those() {
    let tp_breaker = CircuitBreaker { max_requests: Some(8), ..CircuitBreaker::default() };
    // The TrafficPolicy sets the breaker only: the rule's outlier detection and connect timeout
    // apply, its pool limits do not (not even those the TrafficPolicy left out).
    let tp = traffic_policy(Some(tp_breaker), None, None);
    let mut p = plan().with_destination(Some(&tp));
    p.apply_rule_policy(&pool_policy(), Some(&tp), PASSTHROUGH, |_| None);
    assert_eq!(p.breaker, Some(tp_breaker));
    assert_eq!(p.outlier, Some(outlier(3)));
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(1500)));
    // Outlier detection and the connect timeout from the TrafficPolicy; the breaker from the rule.
    let tp = traffic_policy(None, Some(outlier(9)), Some(Duration::from_millis(250)));
    let mut p = plan().with_destination(Some(&tp));
    p.apply_rule_policy(&pool_policy(), Some(&tp), PASSTHROUGH, |_| None);
    assert_eq!(p.outlier, Some(outlier(9)));
    assert_eq!(p.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(p.breaker.and_then(|b| b.max_connections), Some(2));
}

#[test]
fn each_load_balancer_maps_onto_a_choice() {
    let with = |lb: LoadBalancer| {
        let mut p = plan();
        let policy = PolicyLevel { load_balancer: Some(lb), ..PolicyLevel::default() };
        let table = Arc::new(Maglev::build(endpoints(), 257));
        p.apply_rule_policy(&policy, None, PASSTHROUGH, |_| Some(table));
        p
    };
    assert!(matches!(with(LoadBalancer::Default).lb, PlanLb::Node));
    assert!(matches!(with(LoadBalancer::RoundRobin).lb, PlanLb::Policy(LbPolicy::RoundRobin)));
    assert!(matches!(with(LoadBalancer::LeastRequest).lb, PlanLb::Policy(LbPolicy::P2cEwma)));
    assert!(matches!(with(LoadBalancer::Random).lb, PlanLb::Policy(LbPolicy::Random)));
    let passthrough = with(LoadBalancer::Passthrough);
    assert!(matches!(&passthrough.endpoints, Endpoints::Known(e) if e[..] == [PASSTHROUGH]));
    let hashed = with(LoadBalancer::ConsistentHash(ConsistentHash {
        key: HashKey::Header { name: "x-user".into() },
        table_size: None,
    }));
    assert!(matches!(&hashed.lb, PlanLb::Hash { table: Some(t), .. } if t.size() == 257));
    assert!(matches!(hashed.lb.choice(Some(1)), Choice::Hash { hash: 1, table: Some(_) }));
    // A request without the key: a random endpoint, as Envoy does.
    assert!(matches!(hashed.lb.choice(None), Choice::Policy(LbPolicy::Random)));
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut b = http::Request::builder().uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn hashing(key: HashKey) -> PlanLb {
    PlanLb::Hash { key, table: None }
}

const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 10));

#[test]
fn hash_keys_come_from_the_request() {
    let header = hashing(HashKey::Header { name: "x-user".into() });
    let a = header.hash_of(&parts("/", &[("x-user", "alice")]), SOURCE).hash;
    assert_eq!(a, Some(maglev::key_hash(b"alice")));
    assert_ne!(a, header.hash_of(&parts("/", &[("x-user", "bob")]), SOURCE).hash);
    assert_eq!(header.hash_of(&parts("/", &[]), SOURCE).hash, None);

    let query = hashing(HashKey::QueryParameter { name: "user".into() });
    assert_eq!(
        query.hash_of(&parts("/p?a=1&user=alice", &[]), SOURCE).hash,
        Some(maglev::key_hash(b"alice"))
    );
    assert_eq!(query.hash_of(&parts("/p?a=1", &[]), SOURCE).hash, None);

    let source = hashing(HashKey::SourceIp);
    assert_eq!(source.hash_of(&parts("/", &[]), SOURCE).hash, Some(maglev::key_hash(&[10, 244, 1, 10])));
    // An IPv4 client seen as IPv4-mapped IPv6 hashes the same.
    let mapped: IpAddr = "::ffff:10.244.1.10".parse().unwrap();
    assert_eq!(source.hash_of(&parts("/", &[]), mapped).hash, source.hash_of(&parts("/", &[]), SOURCE).hash);
}

#[test]
fn the_hash_cookie_is_honoured_and_set_when_missing() {
    let cookie = |ttl: Option<Duration>| {
        hashing(HashKey::Cookie { name: "session".into(), path: Some("/".into()), ttl })
    };
    let with_ttl = cookie(Some(Duration::from_secs(60)));
    // Present: its value (as sent) is the key, and no cookie is set.
    let sent = with_ttl.hash_of(&parts("/", &[("cookie", "a=1; session=\"abc\"; b=2")]), SOURCE);
    assert_eq!(sent.hash, Some(maglev::key_hash(b"\"abc\"")));
    assert!(sent.set_cookie.is_none());
    // Missing: a new value, set on the response with the ttl, and the request is hashed by it,
    // so the client's next request (carrying it) goes where this one went.
    let new = with_ttl.hash_of(&parts("/", &[("cookie", "a=1")]), SOURCE);
    let set = new.set_cookie.expect("a cookie is set").to_str().unwrap().to_string();
    assert!(
        set.starts_with("session=\"") && set.contains("; Path=/") && set.contains("; Max-Age=60"),
        "{set}"
    );
    let value = set.split(';').next().unwrap().strip_prefix("session=").unwrap();
    let next = with_ttl.hash_of(&parts("/", &[("cookie", &format!("session={value}"))]), SOURCE);
    assert_eq!(next.hash, new.hash);
    // Two clients without the cookie get different values.
    let other = with_ttl.hash_of(&parts("/", &[]), SOURCE);
    assert_ne!(other.set_cookie.unwrap(), set.as_str());
    // A ttl of 0: a session cookie (no Max-Age). No ttl: nothing is set, a random endpoint.
    let session = cookie(Some(Duration::ZERO)).hash_of(&parts("/", &[]), SOURCE);
    assert!(!session.set_cookie.unwrap().to_str().unwrap().contains("Max-Age"));
    let none = cookie(None).hash_of(&parts("/", &[]), SOURCE);
    assert!(none.hash.is_none() && none.set_cookie.is_none());
}
