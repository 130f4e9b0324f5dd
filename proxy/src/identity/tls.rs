//! rustls configurations for the mesh, the only part of identity the data path touches.
//!
//! Configurations are built once per (source, expected server) or per local identity and
//! cached; their certificate resolvers read the manager's current certificate at every
//! handshake, so rotation needs no rebuild, and their verifiers read the current trust bundle.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, ServerConfig, SignatureScheme};

use super::manager::{CertManager, Store};
use super::spiffe::SpiffeId;
use super::verify::{MeshClientVerifier, MeshServerVerifier};
use super::{x509, IdentityError};

/// The ALPN protocol of HBONE: HTTP/2 (CONNECT streams).
pub const ALPN_H2: &[u8] = b"h2";

type ClientConfigs = HashMap<SpiffeId, HashMap<SpiffeId, Arc<ClientConfig>>>;

/// Built configurations. Nested by source so a lookup borrows both IDs (no key allocation on
/// the per-connection path).
#[derive(Default)]
pub(super) struct TlsCache {
    client: RwLock<ClientConfigs>,
    server: RwLock<HashMap<SpiffeId, Arc<ServerConfig>>>,
}

impl TlsCache {
    /// Forgets the configurations of identities that left the node.
    pub fn forget(&self, ids: &[SpiffeId]) {
        let mut client = self.client.write().unwrap_or_else(PoisonError::into_inner);
        let mut server = self.server.write().unwrap_or_else(PoisonError::into_inner);
        for id in ids {
            client.remove(id);
            server.remove(id);
        }
    }
}

impl CertManager {
    /// The client configuration for connections from `source` (a local identity) to a peer
    /// that must present exactly `expected_server`: TLS 1.3, ALPN h2, client certificate =
    /// `source`'s current one. The server name given to rustls is ignored for identity.
    /// Fails if this node holds no certificate for `source`.
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        {
            let cache = self.tls.client.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(cfg) = cache.get(source).and_then(|m| m.get(&expected_server)) {
                return Ok(cfg.clone());
            }
        }
        if !self.store.contains(source) {
            return Err(IdentityError::NoCertificate { identity: source.clone() });
        }
        let verifier = Arc::new(MeshServerVerifier::new(
            self.bundle.clone(),
            self.provider.signature_verification_algorithms,
            expected_server.clone(),
        ));
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(CurrentCert {
                store: self.store.clone(),
                id: source.clone(),
            }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Every connection verifies the peer's current certificate: a resumed session would
        // skip that (and could outlive the certificate it began with). Pooled HBONE
        // connections are long-lived, so full handshakes cost little.
        cfg.resumption = Resumption::disabled();
        let cfg = Arc::new(cfg);
        let mut cache = self.tls.client.write().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.entry(source.clone()).or_default().entry(expected_server).or_insert(cfg);
        Ok(entry.clone())
    }

    /// The server configuration for a local identity's listeners (HBONE on 15008): TLS 1.3,
    /// ALPN h2, server certificate = `local`'s current one, client certificate required and
    /// accepted for any SPIFFE ID of the trust domain whose chain leads to the bundle.
    /// Fails if this node holds no certificate for `local`.
    pub fn server_config(&self, local: &SpiffeId) -> Result<Arc<ServerConfig>, IdentityError> {
        if let Some(cfg) = self.tls.server.read().unwrap_or_else(PoisonError::into_inner).get(local) {
            return Ok(cfg.clone());
        }
        if !self.store.contains(local) {
            return Err(IdentityError::NoCertificate { identity: local.clone() });
        }
        let verifier = Arc::new(MeshClientVerifier::new(
            self.bundle.clone(),
            self.provider.signature_verification_algorithms,
            self.trust_domain.clone(),
        ));
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert { store: self.store.clone(), id: local.clone() }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption, for the same reason as on the client side.
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        let cfg = Arc::new(cfg);
        let mut cache = self.tls.server.write().unwrap_or_else(PoisonError::into_inner);
        Ok(cache.entry(local.clone()).or_insert(cfg).clone())
    }
}

/// The SPIFFE ID of the peer of an established (verified) connection, from its leaf.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    x509::spiffe_id(conn.peer_certificates()?.first()?).ok()
}

/// Presents the manager's current certificate for one identity, on either side.
struct CurrentCert {
    store: Arc<Store>,
    id: SpiffeId,
}

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurrentCert").field("identity", &self.id.to_string()).finish()
    }
}

impl ResolvesClientCert for CurrentCert {
    // CA hints are ignored: the identity, not the server's preference, decides what we present.
    fn resolve(&self, _root_hints: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id)
    }

    fn has_certs(&self) -> bool {
        self.store.contains(&self.id)
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.current(&self.id)
    }
}
