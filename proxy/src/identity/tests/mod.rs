//! Identity tests: SPIFFE IDs, the embedded CA, `ca init`, real TLS 1.3 handshakes between the
//! configurations the data path uses, and rotation.

mod backoff;
mod bundle;
mod ca;
mod fake_ca;
mod fetch;
mod remote;
mod rotation;
mod spiffe;
mod tls;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::ServerName;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::*;
use crate::discovery::{Format, Model};

pub(super) const TD: &str = "cluster.local";

/// web and api run on node-1, db on node-2, a finished job on node-1.
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: 11111111-0000-0000-0000-000000000001}
spec: {nodeName: node-1, serviceAccountName: web}
status: {podIP: 10.244.1.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, uid: 11111111-0000-0000-0000-000000000002}
spec: {nodeName: node-1, serviceAccountName: api}
status: {podIP: 10.244.1.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, uid: 11111111-0000-0000-0000-000000000003}
spec: {nodeName: node-2, serviceAccountName: db}
status: {podIP: 10.244.2.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: migrate-1, namespace: shop, uid: 11111111-0000-0000-0000-000000000004}
spec: {nodeName: node-1, serviceAccountName: migrate}
status: {podIP: 10.244.1.12, phase: Succeeded}
"#;

pub(super) fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa)
}

pub(super) fn model() -> Arc<ArcSwap<Model>> {
    Arc::new(ArcSwap::from_pointee(Model::from_manifest(PODS, Format::Yaml).expect("test manifest parses")))
}

/// A mesh root in a fresh directory (kept alive by the returned TempDir).
pub(super) struct Root {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(super) fn root() -> Root {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca_init(dir.path(), TD, false).expect("ca init");
    Root { dir, cert, key }
}

pub(super) fn embedded_ca(root: &Root, node: &str, lifetime: Duration) -> EmbeddedCa {
    let mut config = EmbeddedCaConfig::new(node, TD);
    config.leaf_lifetime = lifetime;
    EmbeddedCa::load(&root.cert, &root.key, config, model_authorizer(model())).expect("load embedded CA")
}

pub(super) fn manager(root: &Root, node: &str, lifetime: Duration) -> Arc<CertManager> {
    let ca = embedded_ca(root, node, lifetime);
    Arc::new(CertManager::new(node, TD, Arc::new(ca), CertManagerConfig::default()).expect("manager"))
}

/// Node-1 (holding `web`) and node-2 (holding `db`) managers sharing one root.
pub(super) async fn two_nodes(root: &Root, lifetime: Duration) -> (Arc<CertManager>, Arc<CertManager>) {
    let m1 = manager(root, "node-1", lifetime);
    let m2 = manager(root, "node-2", lifetime);
    m1.ensure(&id("web")).await.expect("web on node-1");
    m2.ensure(&id("db")).await.expect("db on node-2");
    (m1, m2)
}

pub(super) type Handshake =
    (std::io::Result<client::TlsStream<DuplexStream>>, std::io::Result<server::TlsStream<DuplexStream>>);

/// A TLS handshake over an in-memory pipe. The server name is an IP, as HBONE dials pod IPs.
pub(super) async fn handshake(
    client_cfg: Arc<rustls::ClientConfig>,
    server_cfg: Arc<rustls::ServerConfig>,
) -> Handshake {
    let (c, s) = duplex(64 * 1024);
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 244, 2, 10)).into());
    tokio::join!(TlsConnector::from(client_cfg).connect(name, c), TlsAcceptor::from(server_cfg).accept(s))
}

/// One request/response over an established session: proves it still carries data.
pub(super) async fn exchange(
    c: &mut client::TlsStream<DuplexStream>,
    s: &mut server::TlsStream<DuplexStream>,
    msg: &[u8],
) {
    c.write_all(msg).await.expect("client write");
    c.flush().await.expect("client flush");
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).await.expect("server read");
    assert_eq!(buf, msg);
    s.write_all(&buf).await.expect("server write");
    s.flush().await.expect("server flush");
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).await.expect("client read");
    assert_eq!(back, msg);
}

/// The rustls error inside a failed handshake's io::Error.
pub(super) fn tls_error(e: &std::io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}

/// The identity-level reason inside a handshake failure, if it is one of ours.
pub(super) fn verify_error(e: &std::io::Error) -> Option<&VerifyError> {
    match tls_error(e) {
        rustls::Error::Other(other) => other.0.downcast_ref::<VerifyError>(),
        _ => None,
    }
}

pub(super) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read file")
}
