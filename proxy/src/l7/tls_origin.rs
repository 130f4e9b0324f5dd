//! The rustls client configurations of TLS origination (a TrafficPolicy's `tls` on a
//! ServiceEntry), built on the control path so that the data path only reads a ready `Arc`:
//!
//! - the system's roots (the CA bundle of the node image, a few hundred certificates parsed
//!   from files) are loaded at start, every [`SYSTEM_ROOTS_RELOAD`], and on SIGHUP;
//! - a policy's own `caCertificates` are built when a model with that policy comes in, before
//!   the data path sees that model;
//! - a DestinationRule's `tls` (SIMPLE or MUTUAL) names files on the node (trust anchors,
//!   client certificate, key): they are read when a model with that rule comes in, and again
//!   with the system's roots (every [`SYSTEM_ROOTS_RELOAD`] and on SIGHUP), so a rotated
//!   certificate mounted from a Secret is picked up without a restart.

use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::discovery::istio::destination_rule::{ClientTls, TlsMode};
use crate::discovery::Model;

/// How often the system's roots are read again (a node image's CA bundle changes with
/// package updates, without a restart).
pub const SYSTEM_ROOTS_RELOAD: Duration = Duration::from_secs(600);

type Built = Result<Arc<rustls::ClientConfig>, String>;

/// A policy's configuration and the PEM it was built from.
struct PolicyTls {
    pem: String,
    config: Built,
}

#[derive(Default)]
pub struct TlsOrigin {
    /// `None` until first loaded.
    system: ArcSwap<Option<Built>>,
    /// The system's roots themselves, for configurations that add to them (a DestinationRule's
    /// client certificate, its subjectAltNames).
    system_roots: ArcSwap<Option<Arc<rustls::RootCertStore>>>,
    /// By policy (`namespace/name`), for policies with `caCertificates`.
    policies: ArcSwap<HashMap<String, Arc<PolicyTls>>>,
    /// By a DestinationRule's `tls` settings (SIMPLE and MUTUAL), whichever rules share them.
    rules: ArcSwap<HashMap<ClientTls, Built>>,
}

impl TlsOrigin {
    /// Reads the system's trust roots and builds their configuration (control path: file I/O).
    pub fn load_system_roots(&self) {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            warn!(error = %e, "reading the system's CA certificates");
        }
        let mut roots = rustls::RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        let built = if roots.is_empty() {
            Err("no trust anchors: the system has no CA certificates (set caCertificates in the policy)"
                .to_string())
        } else {
            client_config(roots.clone())
        };
        match &built {
            Ok(_) => info!(roots = added, ignored, "system trust roots loaded for TLS origination"),
            Err(e) => warn!(error = %e, "no system trust roots for TLS origination"),
        }
        self.system_roots.store(Arc::new((!roots.is_empty()).then(|| Arc::new(roots))));
        self.system.store(Arc::new(Some(built)));
        // The rules' files are read again too (and their configurations that use the system's
        // roots follow them).
        let specs: Vec<ClientTls> = self.rules.load().keys().cloned().collect();
        self.build_rules(specs.into_iter(), &HashMap::new());
    }

    /// Builds the configurations of the DestinationRule `tls` settings `specs`, reusing those
    /// in `keep`; the result replaces the current set.
    fn build_rules(&self, specs: impl Iterator<Item = ClientTls>, keep: &HashMap<ClientTls, Built>) {
        let mut next: HashMap<ClientTls, Built> = HashMap::new();
        for spec in specs {
            if next.contains_key(&spec) {
                continue;
            }
            let built = match keep.get(&spec) {
                Some(b) => b.clone(),
                None => {
                    let b = rule_config(&spec, self.system_roots.load().as_ref().as_ref());
                    if let Err(e) = &b {
                        warn!(error = %e, "DestinationRule TLS origination: unusable settings; requests through this rule fail");
                    }
                    b
                }
            };
            next.insert(spec, built);
        }
        self.rules.store(Arc::new(next));
    }

    /// The configuration of a DestinationRule's `tls` (SIMPLE or MUTUAL), built on the control
    /// path (data path: reads only).
    pub fn rule_config(&self, spec: &ClientTls) -> Built {
        match self.rules.load().get(spec) {
            Some(b) => b.clone(),
            None => Err("the DestinationRule's TLS settings are not built (the rule changed a moment ago?)".into()),
        }
    }

    /// Builds the configurations of the policies of `model` that carry `caCertificates`
    /// (reusing those whose PEM did not change). Call before the data path sees `model`.
    pub fn sync(&self, model: &Model) {
        let current = self.policies.load();
        let mut next: HashMap<String, Arc<PolicyTls>> = HashMap::new();
        for p in model.traffic_policies() {
            let Some(pem) = p.tls.as_ref().and_then(|t| t.ca_certificates.as_ref()) else { continue };
            let key = format!("{}/{}", p.namespace, p.name);
            let entry = match current.get(&key) {
                Some(e) if e.pem == *pem => e.clone(),
                _ => {
                    let config = pem_config(pem);
                    if let Err(e) = &config {
                        warn!(policy = %key, error = %e, "TLS origination: unusable caCertificates; requests through this policy fail");
                    }
                    Arc::new(PolicyTls { pem: pem.clone(), config })
                }
            };
            next.insert(key, entry);
        }
        self.policies.store(Arc::new(next));
        // DestinationRules' TLS settings: new ones are built (their files read), the others kept.
        let specs = model.destination_rules().flat_map(|r| rule_tls(r)).filter(|t| matches!(t.mode, TlsMode::Simple | TlsMode::Mutual));
        let current = self.rules.load_full();
        self.build_rules(specs, &current);
    }

    /// The configuration for policy `key` trusting `ca_pem`, or the system's roots (data path:
    /// reads only). An error when it is not built (yet): the request fails, nothing is loaded.
    pub fn config(&self, key: &str, ca_pem: Option<&str>) -> Built {
        match ca_pem {
            Some(pem) => match self.policies.load().get(key) {
                Some(p) if p.pem == pem => p.config.clone(),
                _ => Err(format!(
                    "the trust anchors of {key} are not built (the policy changed a moment ago?)"
                )),
            },
            None => match self.system.load().as_ref() {
                Some(built) => built.clone(),
                None => Err("the system's trust roots are not loaded yet".into()),
            },
        }
    }
}

/// Every `tls` of a rule: top level, port level, subsets and their port levels.
fn rule_tls(r: &crate::discovery::istio::destination_rule::DestinationRule) -> Vec<ClientTls> {
    let policies = r.traffic_policy.iter().chain(r.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
    policies
        .flat_map(|p| std::iter::once(&p.base).chain(p.port_level.iter().map(|(_, l)| l)))
        .filter_map(|l| l.tls.clone())
        .collect()
}

/// A DestinationRule's SIMPLE or MUTUAL settings as a client configuration: its trust
/// anchors (a PEM file, else the system's roots), its verification (the server's name, one of
/// `subjectAltNames`, or none with `insecureSkipVerify`), and for MUTUAL its certificate.
fn rule_config(spec: &ClientTls, system: Option<&Arc<rustls::RootCertStore>>) -> Built {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots: Arc<rustls::RootCertStore> = match &spec.ca_certificates {
        Some(path) => {
            let pem = read(path, "caCertificates")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("caCertificates {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("caCertificates {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("caCertificates {}: no certificate in the file", path.display()));
            }
            Arc::new(roots)
        }
        None => system.cloned().ok_or("no trust anchors: the system has no CA certificates (set caCertificates)")?,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = if spec.insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verify::NoVerification(provider)))
    } else if !spec.subject_alt_names.is_empty() {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| e.to_string())?;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verify::AltNames {
            inner,
            names: spec.subject_alt_names.clone(),
        }))
    } else {
        builder.with_root_certificates(roots)
    };
    let config = match (spec.mode, &spec.client_certificate, &spec.private_key) {
        (TlsMode::Mutual, Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert, "clientCertificate")?)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("clientCertificate {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!("clientCertificate {}: no certificate in the file", cert.display()));
            }
            let key = PrivateKeyDer::from_pem_slice(&read(key, "privateKey")?)
                .map_err(|e| format!("privateKey {}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("client certificate and key: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Certificate verifiers for what a DestinationRule asks beyond the default.
mod verify {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    /// The chain must lead to the trust anchors and the certificate carry one of `names`
    /// (`subjectAltNames`), whatever the SNI.
    #[derive(Debug)]
    pub struct AltNames {
        pub inner: Arc<WebPkiServerVerifier>,
        pub names: Vec<String>,
    }

    impl ServerCertVerifier for AltNames {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            let mut last = Error::General("no subjectAltNames".into());
            for name in &self.names {
                let Ok(name) = ServerName::try_from(name.as_str()) else { continue };
                match self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp, now) {
                    Ok(v) => return Ok(v),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// `insecureSkipVerify: true`: any certificate (the handshake's signatures are still
    /// checked, so the peer holds the key of the certificate it sent).
    #[derive(Debug)]
    pub struct NoVerification(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

fn pem_config(pem: &str) -> Built {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("caCertificates: {e}"))?;
        roots.add(cert).map_err(|e| format!("caCertificates: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no trust anchors (caCertificates is empty)".into());
    }
    client_config(roots)
}

fn client_config(roots: rustls::RootCertStore) -> Built {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Format;

    fn policy(name: &str, pem: &str) -> String {
        let pem = pem.lines().map(|l| format!("        {l}")).collect::<Vec<_>>().join("\n");
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}-entry, namespace: shop}}
spec:
  hosts: [{name}.internet.test]
  resolution: DNS
  ports: [{{number: 443, name: https, protocol: HTTP}}]
---
apiVersion: sluice.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  targetRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: {name}-entry}}]
  tls:
    mode: SIMPLE
    caCertificates: |
{pem}
---
"#
        )
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn policy_configs_are_built_with_the_model_not_on_first_use() {
        let origin = TlsOrigin::default();
        let pem = ca_pem();
        let model = Model::from_manifest(&policy("secure", &pem), Format::Yaml).expect("manifest parses");
        // Before the model is synced, the data path gets an error, and builds nothing itself.
        assert!(origin.config("shop/secure", Some(&pem)).is_err());
        origin.sync(&model);
        let first = origin.config("shop/secure", Some(&pem)).expect("built on sync");
        // The same PEM in the next model: the very same configuration, not a rebuild.
        origin.sync(&model);
        assert!(Arc::ptr_eq(&first, &origin.config("shop/secure", Some(&pem)).unwrap()));
        // Another PEM for that policy: rebuilt on sync; the old PEM no longer matches.
        let other = ca_pem();
        let model2 = Model::from_manifest(&policy("secure", &other), Format::Yaml).unwrap();
        origin.sync(&model2);
        let second = origin.config("shop/secure", Some(&other)).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(origin.config("shop/secure", Some(&pem)).is_err());
        // The policy gone: its configuration too.
        origin.sync(&Model::default());
        assert!(origin.config("shop/secure", Some(&other)).is_err());
    }

    #[test]
    fn system_roots_are_read_only_when_loaded() {
        let origin = TlsOrigin::default();
        let err = origin.config("shop/any", None).unwrap_err();
        assert!(err.contains("not loaded yet"), "{err}");
        origin.load_system_roots();
        // This machine's image has a CA bundle (the e2e TLS tests rely on it too); either way
        // the answer is now the loaded one, not a load.
        let loaded = origin.config("shop/any", None);
        if let Ok(c) = &loaded {
            assert!(Arc::ptr_eq(c, &origin.config("shop/other", None).unwrap()), "one shared configuration");
        }
    }
}
