//! TLS client settings for scraping metrics pages over HTTPS.
//!
//! The semantics follow the Go EPP's HTTP data sources: `insecureSkipVerify` accepts any
//! server certificate; otherwise the server is verified against `caCertPath` when given, else
//! against the system's CA bundle; `clientCertPath` and `clientKeyPath` present a client
//! identity for mutual TLS. The server name checked against the certificate is the endpoint's
//! IP address, as Go checks the host of `https://ip:port/metrics`.
//!
//! Files are read once, by [`ScrapeTls::load`], so a missing or malformed file fails at
//! startup, naming the path, rather than on every scrape.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    ClientConfig, DigitallySignedStruct, Error as RustlsError, RootCertStore, SignatureScheme,
};

/// The TLS options of a metrics source, as configured (paths, not yet read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Accept any server certificate (the Go default is `true`).
    pub insecure_skip_verify: bool,
    /// PEM bundle of the CAs that verify the server; `None` uses the system bundle.
    pub ca_cert_path: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (set together with the key).
    pub client_cert_path: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_path: Option<PathBuf>,
}

/// The TLS client settings could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSettingsError {
    /// A file could not be read or does not hold what it should.
    #[error("{what} {path}: {problem}")]
    File {
        /// Which setting names the file (`caCertPath`, `clientCertPath`, `clientKeyPath`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Only one of the client certificate and key is set.
    #[error("clientCertPath and clientKeyPath must be set together")]
    HalfClientIdentity,
    /// rustls refused the configuration (for instance a key that does not match its
    /// certificate).
    #[error("TLS client configuration: {0}")]
    Config(String),
}

/// A loaded TLS client configuration for scrapes; cheap to clone.
#[derive(Clone)]
pub struct ScrapeTls {
    connector: TlsConnector,
    settings: TlsSettings,
}

impl fmt::Debug for ScrapeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeTls").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Where the system's CA bundle is looked for when no `caCertPath` is given and
/// `SSL_CERT_FILE` is unset: the Debian/Ubuntu/Alpine and the RHEL/Fedora locations.
const SYSTEM_CA_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

impl ScrapeTls {
    /// Reads the files `settings` names and builds the client configuration.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsSettingsError> {
        // The ring provider is the one tonic's TLS already compiles in; naming it explicitly
        // avoids depending on a process-wide default provider being installed.
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsSettingsError::Config(error.to_string()))?;
        let builder = if settings.insecure_skip_verify {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert {
                algorithms: provider.signature_verification_algorithms,
            }))
        } else {
            builder.with_root_certificates(root_store(settings.ca_cert_path.as_deref())?)
        };
        let config = match (&settings.client_cert_path, &settings.client_key_path) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_path), Some(key_path)) => {
                let chain = read_certificates("clientCertPath", cert_path)?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
                    TlsSettingsError::File {
                        what: "clientKeyPath",
                        path: key_path.clone(),
                        problem: error.to_string(),
                    }
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|error| TlsSettingsError::Config(error.to_string()))?
            }
            _ => return Err(TlsSettingsError::HalfClientIdentity),
        };
        Ok(Self { connector: TlsConnector::from(Arc::new(config)), settings: settings.clone() })
    }

    /// The settings this configuration was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Runs the TLS handshake over `stream`, checking the certificate against `address`'s IP.
    pub async fn connect(
        &self,
        address: SocketAddr,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::IpAddress(address.ip().into());
        self.connector.connect(name, stream).await
    }

    /// Runs the TLS handshake over `stream`, checking the certificate against the DNS name
    /// `host` (sent as SNI too).
    pub async fn connect_named(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        self.connector.connect(name, stream).await
    }
}

/// The roots verifying servers: the `caCertPath` bundle, else the system bundle when one is
/// found (an empty store otherwise, which rejects every server, as it should when nothing is
/// trusted).
fn root_store(ca_cert_path: Option<&Path>) -> Result<RootCertStore, TlsSettingsError> {
    let mut roots = RootCertStore::empty();
    let (what, path) = match ca_cert_path {
        Some(path) => ("caCertPath", path.to_path_buf()),
        None => {
            let system = std::env::var_os("SSL_CERT_FILE")
                .map(PathBuf::from)
                .into_iter()
                .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
                .find(|path| path.is_file());
            let Some(path) = system else { return Ok(roots) };
            ("system CA bundle", path)
        }
    };
    let certificates = read_certificates(what, &path)?;
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(TlsSettingsError::File {
            what,
            path,
            problem: "no usable CA certificate".to_owned(),
        });
    }
    Ok(roots)
}

/// Every certificate of a PEM file; at least one.
fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSettingsError> {
    let failed =
        |problem: String| TlsSettingsError::File { what, path: path.to_path_buf(), problem };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| failed(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| failed(error.to_string()))?;
    if certificates.is_empty() {
        return Err(failed("no PEM certificate in the file".to_owned()));
    }
    Ok(certificates)
}

/// `insecureSkipVerify`: any certificate chain and name are accepted, but the handshake
/// signatures are still checked, so the session is at least bound to the presented key.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
