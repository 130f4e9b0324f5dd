//! The ServiceEntry resolver against a DNS server of the test's own on loopback, which answers
//! A queries with the addresses and TTLs the test chose (and can hold an answer back, or never
//! answer).

use std::{collections::HashMap, net::Ipv4Addr, sync::Mutex as StdMutex};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
use tokio::net::UdpSocket;

use super::*;

#[derive(Clone)]
enum Reply {
    /// Answer with these addresses and this TTL, after `delay`.
    A { ips: Vec<Ipv4Addr>, ttl: u32, delay: Duration },
    /// Never answer.
    Silence,
}

/// A tiny authoritative DNS server on 127.0.0.1 (UDP): names it does not know are NXDOMAIN,
/// AAAA queries for names it knows get an empty answer.
struct TestDns {
    addr: SocketAddr,
    replies: Arc<StdMutex<HashMap<String, Reply>>>,
    /// A queries received, by name.
    asked: Arc<StdMutex<HashMap<String, usize>>>,
}

impl TestDns {
    async fn start() -> TestDns {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let replies: Arc<StdMutex<HashMap<String, Reply>>> = Arc::default();
        let asked: Arc<StdMutex<HashMap<String, usize>>> = Arc::default();
        let (r, a) = (replies.clone(), asked.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
                let Some((name, qtype, question_end)) = parse_query(&buf[..n]) else { continue };
                let reply = r.lock().unwrap().get(&name).cloned();
                if qtype == 1 {
                    *a.lock().unwrap().entry(name.clone()).or_default() += 1;
                }
                let query = buf[..n].to_vec();
                let sock = sock.clone();
                // A task per query: a held-back answer holds back nothing else.
                tokio::spawn(async move {
                    let response = match reply {
                        None => response(&query, question_end, 3, &[], 0),
                        Some(Reply::Silence) => return,
                        Some(Reply::A { ips, ttl, delay }) => {
                            tokio::time::sleep(delay).await;
                            if qtype == 1 {
                                response(&query, question_end, 0, &ips, ttl)
                            } else {
                                response(&query, question_end, 0, &[], ttl)
                            }
                        }
                    };
                    let _ = sock.send_to(&response, from).await;
                });
            }
        });
        TestDns { addr, replies, asked }
    }

    fn set(&self, name: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(name.to_string(), reply);
    }

    fn answer(&self, name: &str, ip: [u8; 4], ttl: u32) {
        self.set(name, Reply::A { ips: vec![Ipv4Addr::from(ip)], ttl, delay: Duration::ZERO });
    }

    fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    fn resolver(&self, cfg: DnsConfig) -> Dns {
        let mut udp = ConnectionConfig::udp();
        udp.port = self.addr.port();
        let server = NameServerConfig::new(self.addr.ip(), true, vec![udp]);
        Dns::with_config(ResolverConfig::from_parts(None, vec![], vec![server]), cfg)
    }
}

/// (name, qtype, end of the question section) of a DNS query.
fn parse_query(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn response(query: &[u8], question_end: usize, rcode: u8, ips: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&query[..2]); // id
    out.extend_from_slice(&[0x84 | (query[2] & 0x01), 0x80 | rcode]); // QR AA (RD), RA, rcode
    out.extend_from_slice(&1u16.to_be_bytes()); // one question
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional
    out.extend_from_slice(&query[12..question_end]);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&1u16.to_be_bytes()); // A
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

fn cfg() -> DnsConfig {
    DnsConfig {
        lookup_timeout: Duration::from_millis(500),
        min_ttl: Duration::from_millis(200),
        max_ttl: Duration::from_secs(300),
        max_entries: 1024,
        max_in_flight: 64,
        pod_max_in_flight: 64,
        pod_max_entries: 1024,
        service_entry_max_in_flight: 64,
        service_entry_max_entries: 1024,
    }
}

/// The pod and ServiceEntry of the tests that are not about quotas.
const WHO: Asker<'static> = Asker { pod: "shop/client", service_entry: "shop/external" };

fn addrs(a: &[SocketAddr]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn answers_are_reused_for_their_ttl() {
    let server = TestDns::start().await;
    server.answer("api.example.test", [192, 0, 2, 7], 1);
    let dns = server.resolver(cfg());
    let got = dns.resolve("api.example.test", 443, WHO).await.unwrap();
    assert_eq!(addrs(&got), ["192.0.2.7:443"]);
    // Within the TTL: from the cache (any port, any case, with or without the root dot).
    server.answer("api.example.test", [192, 0, 2, 8], 1);
    assert_eq!(addrs(&dns.resolve("API.example.test.", 80, WHO).await.unwrap()), ["192.0.2.7:80"]);
    assert_eq!(server.asked("api.example.test"), 1);
    assert_eq!(dns.counters().cache_hits.load(Ordering::Relaxed), 1);
    // Past the TTL (1 s): asked again, and the new answer is used.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(addrs(&dns.resolve("api.example.test", 443, WHO).await.unwrap()), ["192.0.2.8:443"]);
    assert_eq!(server.asked("api.example.test"), 2);
}

#[tokio::test]
async fn ttls_are_clamped_to_the_floor_and_the_ceiling() {
    let server = TestDns::start().await;
    server.answer("zero.test", [192, 0, 2, 1], 0);
    server.answer("day.test", [192, 0, 2, 2], 86_400);
    let dns = server.resolver(DnsConfig { max_ttl: Duration::from_millis(400), ..cfg() });
    dns.resolve("zero.test", 80, WHO).await.unwrap();
    dns.resolve("day.test", 80, WHO).await.unwrap();
    // TTL 0 is held for the floor (200 ms), not re-asked per request.
    dns.resolve("zero.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("zero.test"), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    dns.resolve("zero.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("zero.test"), 2, "past the floor");
    dns.resolve("day.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("day.test"), 1, "within the ceiling");
    // A day's TTL is held for the ceiling (400 ms) only.
    tokio::time::sleep(Duration::from_millis(200)).await;
    dns.resolve("day.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("day.test"), 2, "past the ceiling");
}

#[tokio::test]
async fn concurrent_requests_for_a_host_share_one_lookup() {
    let server = TestDns::start().await;
    server.set(
        "slow.test",
        Reply::A { ips: vec![Ipv4Addr::new(192, 0, 2, 9)], ttl: 60, delay: Duration::from_millis(150) },
    );
    let dns = Arc::new(server.resolver(cfg()));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let dns = dns.clone();
            tokio::spawn(async move { dns.resolve("slow.test", 8080, WHO).await })
        })
        .collect();
    for w in waiters {
        assert_eq!(addrs(&w.await.unwrap().unwrap()), ["192.0.2.9:8080"]);
    }
    assert_eq!(server.asked("slow.test"), 1);
    let c = dns.counters();
    assert_eq!(c.lookups.load(Ordering::Relaxed), 1);
    assert_eq!(c.coalesced.load(Ordering::Relaxed) + c.cache_hits.load(Ordering::Relaxed), 9);
}

#[tokio::test]
async fn a_silent_server_times_out_and_failures_are_cached_briefly() {
    let server = TestDns::start().await;
    server.set("hang.test", Reply::Silence);
    let dns = server.resolver(cfg());
    let started = Instant::now();
    let err = dns.resolve("hang.test", 80, WHO).await.unwrap_err();
    assert!(matches!(err, DnsError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(dns.counters().timeouts.load(Ordering::Relaxed), 1);
    // NXDOMAIN: an error naming the host, remembered for the floor (no new query).
    let err = dns.resolve("nowhere.test", 80, WHO).await.unwrap_err();
    assert!(err.to_string().contains("nowhere.test"), "{err}");
    let again = dns.resolve("nowhere.test", 80, WHO).await.unwrap_err();
    assert_eq!(err, again);
    assert_eq!(dns.counters().lookups.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn lookups_in_flight_are_bounded() {
    let server = TestDns::start().await;
    let dns = Arc::new(server.resolver(DnsConfig {
        max_in_flight: 2,
        lookup_timeout: Duration::from_secs(3),
        ..cfg()
    }));
    let mut hanging = Vec::new();
    for host in ["a.hang.test", "b.hang.test"] {
        server.set(host, Reply::Silence);
        let dns = dns.clone();
        hanging.push(tokio::spawn(async move { dns.resolve(host, 80, WHO).await }));
    }
    // Both lookups are running once both queries reached the server.
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.asked("a.hang.test") == 0 || server.asked("b.hang.test") == 0 {
        assert!(Instant::now() < deadline, "the two lookups never reached the server");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.answer("c.test", [192, 0, 2, 3], 60);
    let started = Instant::now();
    let err = dns.resolve("c.test", 80, WHO).await.unwrap_err();
    assert!(matches!(err, DnsError::TooManyLookups { limit: 2, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(100), "refused at once, not queued");
    assert_eq!(dns.counters().lookups_refused.load(Ordering::Relaxed), 1);
    assert_eq!(server.asked("c.test"), 0);
    // A host already being looked up still joins its lookup.
    let joined = {
        let dns = dns.clone();
        tokio::spawn(async move { dns.resolve("a.hang.test", 80, WHO).await })
    };
    for h in hanging {
        h.abort();
    }
    joined.abort();
}

#[tokio::test]
async fn the_cache_is_bounded_and_evicts_expired_then_soonest() {
    let server = TestDns::start().await;
    let dns = server.resolver(DnsConfig { max_entries: 3, ..cfg() });
    for (i, ttl) in [(1u8, 60u32), (2, 1), (3, 120), (4, 60), (5, 60)] {
        let host = format!("h{i}.test");
        server.answer(&host, [192, 0, 2, i], ttl);
        dns.resolve(&host, 80, WHO).await.unwrap();
        assert!(dns.len() <= 3, "{} entries", dns.len());
    }
    assert_eq!(dns.counters().cache_evictions.load(Ordering::Relaxed), 2);
    // h2 (1 s) went first, then h1 (60 s, the soonest of the rest): h3 is still cached.
    dns.resolve("h3.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("h3.test"), 1);
    dns.resolve("h1.test", 80, WHO).await.unwrap();
    assert_eq!(server.asked("h1.test"), 2);
}

#[tokio::test]
async fn a_failed_refresh_serves_the_previous_answer() {
    let server = TestDns::start().await;
    server.answer("flaky.test", [192, 0, 2, 5], 0);
    let dns = server.resolver(cfg());
    assert_eq!(addrs(&dns.resolve("flaky.test", 80, WHO).await.unwrap()), ["192.0.2.5:80"]);
    server.set("flaky.test", Reply::Silence);
    tokio::time::sleep(Duration::from_millis(250)).await; // past the floor
    assert_eq!(addrs(&dns.resolve("flaky.test", 80, WHO).await.unwrap()), ["192.0.2.5:80"]);
    assert_eq!(dns.counters().stale_served.load(Ordering::Relaxed), 1);
    assert_eq!(dns.counters().timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn addresses_are_not_looked_up() {
    let server = TestDns::start().await;
    let dns = server.resolver(cfg());
    assert_eq!(addrs(&dns.resolve("192.0.2.1", 80, WHO).await.unwrap()), ["192.0.2.1:80"]);
    assert_eq!(addrs(&dns.resolve("[2001:db8::1]", 80, WHO).await.unwrap()), ["[2001:db8::1]:80"]);
    assert_eq!(dns.counters().lookups.load(Ordering::Relaxed), 0);
}

/// Resolves `host` for `who` if that ends at once (refused, or answered from the cache);
/// `None` when a lookup started and is still running (the lookup goes on without the caller).
fn resolve_now(dns: &Dns, host: &str, who: Asker<'_>) -> Option<Result<Arc<[SocketAddr]>, DnsError>> {
    use futures_util::FutureExt;
    dns.resolve(host, 80, who).now_or_never()
}

/// A pod resolving random hosts under a domain whose server never answers (a wildcard
/// ServiceEntry's Host headers) holds only its own share of the lookups: the node still looks
/// up another pod's hosts.
#[tokio::test]
async fn one_pods_hanging_lookups_leave_the_other_pods_theirs() {
    let server = TestDns::start().await;
    let dns = server.resolver(DnsConfig {
        max_in_flight: 8,
        pod_max_in_flight: 2,
        lookup_timeout: Duration::from_secs(3),
        ..cfg()
    });
    let evil = Asker { pod: "tenant/evil", service_entry: "tenant/wildcard" };
    let good = Asker { pod: "shop/client", service_entry: "shop/api" };
    let mut started = Vec::new();
    for i in 0..20 {
        let host = format!("r{i}.hang.test");
        server.set(&host, Reply::Silence);
        match resolve_now(&dns, &host, evil) {
            None => started.push(host),
            Some(Err(DnsError::TooManyLookups { limit: 2, scope, .. })) => {
                assert_eq!(scope, "for pod tenant/evil")
            }
            Some(other) => panic!("{host}: {other:?}"),
        }
    }
    assert_eq!(started.len(), 2, "the pod's share of lookups in flight");
    let c = dns.counters();
    assert_eq!(c.lookups_refused_pod.load(Ordering::Relaxed), 18);
    assert_eq!(c.lookups_refused.load(Ordering::Relaxed), 0, "the node's lookups were never all taken");
    // The other pod's lookups go through while the hanging ones still run.
    server.answer("api.test", [192, 0, 2, 10], 60);
    assert_eq!(addrs(&dns.resolve("api.test", 80, good).await.unwrap()), ["192.0.2.10:80"]);
    assert_eq!(c.lookups.load(Ordering::Relaxed), 3);
}

/// The hosts of one ServiceEntry share a bound too, whichever pods ask: another entry's hosts
/// are still looked up.
#[tokio::test]
async fn a_service_entrys_lookups_in_flight_are_bounded() {
    let server = TestDns::start().await;
    let dns = server.resolver(DnsConfig {
        service_entry_max_in_flight: 3,
        lookup_timeout: Duration::from_secs(3),
        ..cfg()
    });
    for (i, pod) in ["a/one", "a/one", "b/two"].into_iter().enumerate() {
        let host = format!("h{i}.hang.test");
        server.set(&host, Reply::Silence);
        assert!(resolve_now(&dns, &host, Asker { pod, service_entry: "x/slow" }).is_none(), "{host} started");
    }
    server.set("h3.hang.test", Reply::Silence);
    let refused = resolve_now(&dns, "h3.hang.test", Asker { pod: "c/three", service_entry: "x/slow" });
    assert!(
        matches!(&refused, Some(Err(DnsError::TooManyLookups { limit: 3, scope, .. })) if scope == "for ServiceEntry x/slow"),
        "{refused:?}"
    );
    assert_eq!(dns.counters().lookups_refused_service_entry.load(Ordering::Relaxed), 1);
    server.answer("fine.test", [192, 0, 2, 11], 60);
    let other = Asker { pod: "c/three", service_entry: "y/fine" };
    assert_eq!(addrs(&dns.resolve("fine.test", 80, other).await.unwrap()), ["192.0.2.11:80"]);
}

/// A pod flooding the cache with new hosts (answered, with long TTLs) evicts its own entries:
/// another pod's cached answers stay (before the shares, the flood's longer TTLs made the
/// other pod's entries the soonest-expiring, hence the first to go).
#[tokio::test]
async fn one_pods_new_hosts_do_not_evict_another_pods_cache() {
    let server = TestDns::start().await;
    let dns = server.resolver(DnsConfig { max_entries: 8, pod_max_entries: 4, ..cfg() });
    let good = Asker { pod: "shop/client", service_entry: "shop/api" };
    let evil = Asker { pod: "tenant/evil", service_entry: "tenant/wildcard" };
    for i in 1..=3u8 {
        let host = format!("g{i}.test");
        server.answer(&host, [192, 0, 2, i], 60);
        dns.resolve(&host, 80, good).await.unwrap();
    }
    for i in 0..100u8 {
        let host = format!("r{i}.evil.test");
        server.answer(&host, [198, 51, 100, i], 300);
        dns.resolve(&host, 80, evil).await.unwrap();
        assert!(dns.len() <= 8, "{} entries", dns.len());
    }
    let c = dns.counters();
    assert_eq!(c.cache_evictions_pod.load(Ordering::Relaxed), 96, "the flood evicted its own entries");
    assert_eq!(c.cache_evictions.load(Ordering::Relaxed), 0, "the cache never filled");
    for i in 1..=3u8 {
        let host = format!("g{i}.test");
        dns.resolve(&host, 80, good).await.unwrap();
        assert_eq!(server.asked(&host), 1, "{host} still cached");
    }
    // The flood's latest hosts are the ones it kept.
    dns.resolve("r99.evil.test", 80, evil).await.unwrap();
    assert_eq!(server.asked("r99.evil.test"), 1);
    dns.resolve("r0.evil.test", 80, evil).await.unwrap();
    assert_eq!(server.asked("r0.evil.test"), 2);
}

/// A full cache makes room in the entries of the pod that holds the most, not in those of a
/// pod within its share (even if they expire sooner).
#[tokio::test]
async fn a_full_cache_evicts_from_the_pod_holding_the_most() {
    let server = TestDns::start().await;
    let dns = server.resolver(DnsConfig { max_entries: 6, pod_max_entries: 4, ..cfg() });
    let [a, b, c] = ["ns/a", "ns/b", "ns/c"].map(|pod| Asker { pod, service_entry: "ns/entry" });
    let resolve = |who: Asker<'static>, host: String, ttl: u32| {
        server.answer(&host, [192, 0, 2, 1], ttl);
        let dns = &dns;
        async move { dns.resolve(&host, 80, who).await.unwrap() }
    };
    resolve(b, "b1.test".into(), 10).await;
    for i in 0..4 {
        resolve(a, format!("a{i}.test"), 300).await;
    }
    resolve(c, "c0.test".into(), 300).await;
    assert_eq!(dns.len(), 6);
    resolve(c, "c1.test".into(), 300).await;
    assert_eq!(dns.len(), 6);
    assert_eq!(dns.counters().cache_evictions.load(Ordering::Relaxed), 1);
    dns.resolve("b1.test", 80, b).await.unwrap();
    assert_eq!(server.asked("b1.test"), 1, "b's entry stays, though it expires soonest");
    dns.resolve("a0.test", 80, a).await.unwrap();
    assert_eq!(server.asked("a0.test"), 2, "a's oldest entry went");
}

/// A host that is not a DNS name fails at once, is never sent to the resolver and never
/// cached; names are compared in lower case, without the root's dot.
#[tokio::test]
async fn hosts_that_are_not_dns_names_are_refused_before_any_lookup() {
    let server = TestDns::start().await;
    let dns = server.resolver(cfg());
    let long_label = format!("{}.test", "a".repeat(64));
    let long_name = format!("{}.test", ["abcdefghi"; 25].join("."));
    assert_eq!(long_name.len(), 254);
    let bad = [
        "",
        ".",
        "a..test",
        "a.test..",
        ".a.test",
        "-a.test",
        "a-.test",
        "under_score.test",
        "sp ace.test",
        "caf\u{e9}.test",
        "a.test/x",
        "127.1",
        "1.2.3.4.5",
        long_label.as_str(),
        long_name.as_str(),
    ];
    for host in bad {
        let err = dns.resolve(host, 80, WHO).await.unwrap_err();
        assert!(matches!(err, DnsError::InvalidHost { .. }), "{host:?}: {err}");
    }
    assert_eq!(dns.counters().invalid_hosts.load(Ordering::Relaxed), bad.len() as u64);
    assert_eq!(dns.counters().lookups.load(Ordering::Relaxed), 0);
    assert!(dns.is_empty());
    // A huge Host is shortened in the error.
    let huge = "x".repeat(60_000);
    let err = dns.resolve(&huge, 80, WHO).await.unwrap_err().to_string();
    assert!(err.len() < 200, "{err}");

    let longest = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
    assert_eq!(longest.len(), 253);
    for (host, name) in
        [("Api-1.Example.TEST.", "api-1.example.test"), ("x1.test", "x1.test"), (&longest, &longest)]
    {
        server.answer(name, [192, 0, 2, 20], 60);
        dns.resolve(host, 80, WHO).await.unwrap();
        assert_eq!(server.asked(name), 1, "{host}");
    }
    assert_eq!(dns.len(), 3);
}
