//! The rustls client configurations of TLS origination (a TrafficPolicy's `tls` on a
//! ServiceEntry), built on the control path so that the data path only reads a ready `Arc`:
//!
//! - the system's roots (the CA bundle of the node image, a few hundred certificates parsed
//!   from files) are loaded at start, every [`SYSTEM_ROOTS_RELOAD`], and on SIGHUP;
//! - a policy's own `caCertificates` are built when a model with that policy comes in, before
//!   the data path sees that model.

use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tracing::{info, warn};

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
    /// By policy (`namespace/name`), for policies with `caCertificates`.
    policies: ArcSwap<HashMap<String, Arc<PolicyTls>>>,
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
            client_config(roots)
        };
        match &built {
            Ok(_) => info!(roots = added, ignored, "system trust roots loaded for TLS origination"),
            Err(e) => warn!(error = %e, "no system trust roots for TLS origination"),
        }
        self.system.store(Arc::new(Some(built)));
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
