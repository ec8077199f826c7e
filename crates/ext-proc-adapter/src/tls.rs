//! TLS for the ext-proc port: a certificate from `--cert-path` (`tls.crt` and `tls.key`, as
//! the Go EPP and Kubernetes secrets name them), or a self-signed one made at start.

use std::path::{Path, PathBuf};

use tonic::transport::{Identity, ServerTlsConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The self-signed certificate could not be made.
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(String),
}

/// A certificate and key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct PemIdentity {
    /// The certificate chain.
    pub certificate: String,
    /// The private key.
    pub key: String,
}

impl PemIdentity {
    /// Reads `tls.crt` and `tls.key` from `directory`.
    pub fn from_directory(directory: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = directory.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(Self { certificate: read("tls.crt")?, key: read("tls.key")? })
    }

    /// A fresh self-signed certificate for `localhost` and the loopback addresses.
    pub fn self_signed() -> Result<Self, TlsError> {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        let certified = rcgen::generate_simple_self_signed(names)
            .map_err(|error| TlsError::SelfSigned(error.to_string()))?;
        Ok(Self { certificate: certified.cert.pem(), key: certified.signing_key.serialize_pem() })
    }

    /// The tonic server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.certificate, &self.key))
    }
}
