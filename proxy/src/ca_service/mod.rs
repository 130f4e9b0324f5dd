//! `sluice ca serve`: the CA service. It holds the signing key so that no node does, answers
//! Istio's certificate protocol (`istio.v1.auth.IstioCertificateService/CreateCertificate`)
//! over gRPC and TLS, and signs a workload certificate only for a node agent asking for the
//! identity of a pod the scheduler placed on that agent's node.
//!
//! A request is answered only if all of these hold, each refusal with its own gRPC code, its
//! reason in words, a metric label and a log line (`refusal.rs`):
//!
//! - the CA is ready: its watch of the cluster's pods has its first complete list and is being
//!   followed (`pods`), and its signing chain has not expired;
//! - the bearer token's own claims could pass (`claims`), and a TokenReview finds it valid for
//!   the CA's audience (`authn`);
//! - the token is the node agents' ServiceAccount's and bound to a node agent's pod (a
//!   DaemonSet's host-network pod), whose node is the caller's (`policy`);
//! - the node is within its rate (`limits`);
//! - the identity (`ImpersonatedIdentity`, else the CSR's URI) is in the trust domain and a pod
//!   of that namespace and ServiceAccount is scheduled on the caller's node and not finished
//!   (`policy`);
//! - the CSR carries exactly that URI, nothing else, no CA rights, a strong key (`csr`).
//!
//! The certificate (`signer`) is an X.509-SVID valid min(asked, `--max-lifetime-s`) and at
//! least a minute, never past the signing chain; the response is leaf, signing certificate,
//! `--chain`, root. The service is stateless: its inputs are the signing files (re-read when
//! they change, `reload`), the API server, and the requests. Layout: `server` (gRPC over TLS and
//! the handler), `admission` (connections and streams per source), `serving` (its own TLS
//! certificate), `metrics` (and readiness).

pub mod admission;
pub mod authn;
pub mod claims;
pub mod csr;
pub mod limits;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod refusal;
pub mod reload;
pub mod server;
pub mod serving;
pub mod signer;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::discovery::KubeConfig;
use crate::identity::check_trust_domain;

/// Default serving names: the CA's Service in `sluice-system`.
pub const DEFAULT_SERVER_NAMES: [&str; 2] =
    ["sluice-ca.sluice-system.svc", "sluice-ca.sluice-system.svc.cluster.local"];
/// How long open connections may finish after SIGTERM.
pub const DRAIN: Duration = Duration::from_secs(5);

/// `sluice ca serve`'s settings.
#[derive(Debug, Clone)]
pub struct CaServeConfig {
    pub listen: SocketAddr,
    pub files: signer::SignerFiles,
    pub server_names: Vec<String>,
    pub trust_domain: String,
    /// `namespace/name`.
    pub node_service_account: String,
    pub audience: String,
    pub max_lifetime: Duration,
    pub rate: limits::RateConfig,
    pub metrics_addr: SocketAddr,
    pub kube: KubeConfig,
}

impl CaServeConfig {
    /// The handler's rules, after checking the flags.
    pub fn service_config(&self) -> Result<server::ServiceConfig> {
        check_trust_domain(&self.trust_domain).context("--trust-domain")?;
        let Some((ns, name)) = self
            .node_service_account
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        else {
            bail!("--node-service-account must be NAMESPACE/NAME (got {:?})", self.node_service_account);
        };
        if self.audience.is_empty() {
            bail!("--audience must not be empty");
        }
        if self.max_lifetime < server::MIN_LIFETIME || self.max_lifetime > server::MAX_LIFETIME {
            bail!(
                "--max-lifetime-s must be at least {} s and at most {} s (366 days)",
                server::MIN_LIFETIME.as_secs(),
                server::MAX_LIFETIME.as_secs()
            );
        }
        if self.server_names.is_empty() {
            bail!("at least one --server-name is needed");
        }
        self.rate.validate().map_err(anyhow::Error::msg)?;
        Ok(server::ServiceConfig {
            policy: policy::PolicyConfig {
                trust_domain: self.trust_domain.clone(),
                node_service_account: (ns.to_string(), name.to_string()),
                audience: self.audience.clone(),
            },
            max_lifetime: self.max_lifetime,
            rate: self.rate,
        })
    }
}

/// Runs the CA service until SIGTERM or SIGINT.
pub fn run(config: CaServeConfig) -> Result<()> {
    let service_config = config.service_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-ca")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config, service_config))
}

async fn serve(config: CaServeConfig, service_config: server::ServiceConfig) -> Result<()> {
    let signing = Arc::new(
        reload::SigningState::load(
            config.files.clone(),
            config.server_names.clone(),
            signer::SERVING_LIFETIME,
        )
        .context("loading the signing files")?,
    );
    let client = crate::discovery::kube::client(&config.kube)
        .await
        .with_context(|| format!("connecting to the Kubernetes API ({})", config.kube.describe()))?;
    let pods = Arc::new(pods::PodStore::default());
    tokio::spawn(pods::watch_pods(client.clone(), pods.clone()));
    let (node_ns, node_name) = &service_config.policy.node_service_account;
    let reviewer = Arc::new(authn::CachedReviewer::new(
        Arc::new(authn::KubeTokenReviewer::new(client)),
        authn::ReviewLimits::for_node_account(node_ns, node_name),
    ));
    let metrics = Arc::new(metrics::CaMetrics::default());
    let service = Arc::new(server::CaService::new(
        service_config,
        signing.clone(),
        reviewer.clone(),
        pods.clone(),
        metrics.clone(),
    ));

    let gauges: metrics::GaugeSource = {
        let (signing, pods, service, reviewer) =
            (signing.clone(), pods.clone(), service.clone(), reviewer.clone());
        Arc::new(move || {
            let signer = signing.signer();
            metrics::Gauges {
                ready: service.readiness().is_ok(),
                pods: pods.len(),
                rate_tracked_nodes: service.limiter().tracked(),
                rate_table_evictions: service.limiter().evictions(),
                token_reviews: reviewer.stats.reviews.load(Ordering::Relaxed),
                token_review_cache_hits: reviewer.stats.hits.load(Ordering::Relaxed),
                token_review_cache_entries: reviewer.entries(),
                token_reviews_uncached: reviewer.stats.uncached.load(Ordering::Relaxed),
                token_reviews_throttled: reviewer.stats.throttled.load(Ordering::Relaxed),
                review_sources: reviewer.tracked_sources(),
                signing_chain_not_after: signer.info().not_after.unix_timestamp(),
                serving_cert_not_after: signing.serving().not_after().unix_timestamp(),
                signing_root_index: signer.info().root_index,
                reloads: signing.reloads.load(Ordering::Relaxed),
                reload_failures: signing.reload_failures.load(Ordering::Relaxed),
            }
        })
    };
    let ready: metrics::ReadySource = {
        let service = service.clone();
        Arc::new(move || service.readiness().map_err(|refusal| refusal.to_string()))
    };
    let metrics_listener = metrics::bind(config.metrics_addr)
        .with_context(|| format!("binding --metrics-addr {}", config.metrics_addr))?;
    let scrape = Arc::new(metrics::Scrape::new(metrics, gauges, ready));
    tokio::spawn(metrics::serve(
        tokio::net::TcpListener::from_std(metrics_listener)?,
        scrape,
        metrics::MAX_METRICS_CONNECTIONS,
    ));
    tokio::spawn(signing.clone().run());

    let tls = Arc::new(serving::server_config(signing.serving()).context("TLS configuration")?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    info!(
        listen = %config.listen, metrics = %config.metrics_addr, server_names = ?config.server_names,
        trust_domain = %config.trust_domain, node_service_account = %config.node_service_account,
        audience = %config.audience, max_lifetime_s = config.max_lifetime.as_secs(),
        node_rate = config.rate.rate, node_burst = config.rate.burst,
        "CA service listening; answering UNAVAILABLE until the pod watch has synced"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server =
        tokio::spawn(server::serve(listener, tls, service, server::ServerLimits::default(), stop_rx));
    let why = stop_signal().await;
    info!(signal = why, "stopping: no new connections, open ones get GOAWAY");
    stop_tx.send_replace(true);
    if server.await.is_err() {
        warn!("the gRPC server task ended abnormally");
    }
    Ok(())
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot listen for SIGTERM/SIGINT; stop the CA with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn config() -> CaServeConfig {
        CaServeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            files: signer::SignerFiles {
                signing_cert: "ca.pem".into(),
                signing_key: "ca-key.pem".into(),
                chain: None,
                trust_bundle: "root.pem".into(),
            },
            server_names: DEFAULT_SERVER_NAMES.iter().map(|n| n.to_string()).collect(),
            trust_domain: "cluster.local".into(),
            node_service_account: "sluice-system/sluice".into(),
            audience: "sluice-ca".into(),
            max_lifetime: Duration::from_secs(86400),
            rate: limits::RateConfig { rate: 50.0, burst: 50 },
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            kube: KubeConfig::default(),
        }
    }

    #[test]
    fn flags_are_checked_before_anything_starts() {
        let ok = config().service_config().expect("the defaults are valid");
        assert_eq!(ok.policy.node_service_account, ("sluice-system".to_string(), "sluice".to_string()));
        let bad = |f: fn(&mut CaServeConfig)| {
            let mut c = config();
            f(&mut c);
            c.service_config().expect_err("must be refused").to_string()
        };
        assert!(bad(|c| c.node_service_account = "sluice".into()).contains("NAMESPACE/NAME"));
        assert!(bad(|c| c.node_service_account = "a/b/c".into()).contains("NAMESPACE/NAME"));
        assert!(bad(|c| c.trust_domain = "Bad Domain".into()).contains("--trust-domain"));
        assert!(bad(|c| c.max_lifetime = Duration::from_secs(30)).contains("at least 60"));
        // Finding 13: a huge --max-lifetime-s overflowed the certificate's end and panicked
        // per request.
        assert!(bad(|c| c.max_lifetime = Duration::from_secs(u64::MAX / 2)).contains("at most"));
        assert!(bad(|c| c.rate.rate = 1e-300).contains("--node-rate"));
        assert!(bad(|c| c.server_names.clear()).contains("--server-name"));
        assert!(bad(|c| c.audience.clear()).contains("--audience"));
        assert!(bad(|c| c.rate.burst = 0).contains("--node-burst"));
    }
}
