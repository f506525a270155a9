//! TLS client material for talking to KMIP servers: CA bundle, client certificate and key.
//!
//! Owns the rustls client configuration shared by every connection of a KMS cluster. Built once
//! on a control thread at start-up (or config reload). It exists so that certificate problems
//! are reported when the configuration is loaded, not at the first key fetch.
//!
//! Provider: rustls with `ring`. Protocols: TLS 1.2 and 1.3 (PyKMIP offers only 1.2, with
//! ECDHE-ECDSA-AES-GCM suites usable by rustls, hence ECDSA server certificates).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::KmsConfigError;

/// TLS settings for one KMS cluster. Cheap to clone (shared configuration).
#[derive(Clone)]
pub struct TlsMaterial {
    config: Arc<rustls::ClientConfig>,
}

impl TlsMaterial {
    /// From PEM text: `ca_pem` holds one or more trusted CA certificates, `cert_pem` the client
    /// certificate (optionally followed by intermediates), `key_pem` its private key (PKCS#8,
    /// SEC1 or PKCS#1).
    pub fn from_pem(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, KmsConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut ca_count = 0;
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| pem_error("CA bundle", e))?;
            roots.add(cert)?;
            ca_count += 1;
        }
        if ca_count == 0 {
            return Err(KmsConfigError::Pem {
                what: "CA bundle",
                detail: "no certificate found".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error("client certificate", e))?;
        if chain.is_empty() {
            return Err(KmsConfigError::Pem {
                what: "client certificate",
                detail: "no certificate found".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_error("client key", e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// From PEM files (see [`TlsMaterial::from_pem`]).
    pub fn from_files(
        ca_file: &Path,
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<Self, KmsConfigError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| KmsConfigError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let key = zeroize::Zeroizing::new(read(key_file)?);
        Self::from_pem(&read(ca_file)?, &read(cert_file)?, &key)
    }

    pub(crate) fn config(&self) -> &Arc<rustls::ClientConfig> {
        &self.config
    }
}

fn pem_error(what: &'static str, e: rustls::pki_types::pem::Error) -> KmsConfigError {
    KmsConfigError::Pem {
        what,
        detail: e.to_string(),
    }
}
