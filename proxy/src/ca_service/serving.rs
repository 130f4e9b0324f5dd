//! The CA's TLS side: its serving certificate, which it issues itself with its signing key for
//! the `--server-name`s (nodes verify it against the trust bundle, like any mesh certificate),
//! and the rustls configuration: TLS 1.3 and 1.2, ALPN `h2`, no client certificate (callers
//! authenticate with their token).
//!
//! The certificate sits behind a resolver that reads the current one on every handshake, so a
//! renewal (before expiry, or when the signing material changes) needs no restart and leaves
//! open connections alone.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use time::OffsetDateTime;

use super::signer::Signer;

/// The current serving certificate.
pub struct ServingCert {
    names: Vec<String>,
    lifetime: std::time::Duration,
    current: ArcSwap<CertifiedKey>,
    /// (issued at, valid until) of the current certificate.
    validity: Mutex<(OffsetDateTime, OffsetDateTime)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Issues the first serving certificate with `signer`.
    pub fn issue(
        signer: &Signer,
        names: Vec<String>,
        lifetime: std::time::Duration,
    ) -> Result<ServingCert, String> {
        let now = OffsetDateTime::now_utc();
        let (key, not_after) = signer.issue_serving(&names, lifetime)?;
        Ok(ServingCert {
            names,
            lifetime,
            current: ArcSwap::new(key),
            validity: Mutex::new((now, not_after)),
        })
    }

    /// Replaces the certificate with a new one from `signer`.
    pub fn renew(&self, signer: &Signer) -> Result<OffsetDateTime, String> {
        let now = OffsetDateTime::now_utc();
        let (key, not_after) = signer.issue_serving(&self.names, self.lifetime)?;
        self.current.store(key);
        *self.validity.lock().unwrap_or_else(|e| e.into_inner()) = (now, not_after);
        Ok(not_after)
    }

    /// Past half of the current certificate's life.
    pub fn due(&self, now: OffsetDateTime) -> bool {
        let (from, until) = *self.validity.lock().unwrap_or_else(|e| e.into_inner());
        now >= from + (until - from) / 2
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.validity.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The CA's rustls server configuration.
pub fn server_config(serving: Arc<ServingCert>) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
