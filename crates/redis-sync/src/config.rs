//! The `redis-cross-replica-syncer` plugin type: its parameters, their defaults and checks.
//!
//! ```yaml
//! plugins:
//! - name: sync
//!   type: redis-cross-replica-syncer
//!   parameters:
//!     address: redis://redis.epp.svc:6379   # or host:port; rediss:// or tls: true for TLS
//!     passwordEnv: REDIS_PASSWORD           # or passwordFile: /etc/redis/password
//!     caFile: /etc/redis-tls/ca.crt         # TLS only: the CAs that verify the server
//!     certFile: /etc/redis-tls/tls.crt      # TLS only: a client certificate and its key,
//!     keyFile: /etc/redis-tls/tls.key       #   for `tls-auth-clients yes`
//!     keyPrefix: epp                        # default "epp"
//!     poolName: my-pool                     # default: the picker's --pool-name
//! dataLayer:
//!   crossReplicaSyncerPluginRef: sync
//!   crossReplicaSyncInterval: 200ms         # llm-d's default
//! ```
//!
//! Unknown keys are errors. The sync interval comes from `dataLayer.crossReplicaSyncInterval`
//! (llm-d's key) or, when that is absent, from the plugin's own `syncInterval`; default 200 ms.
//!
//! # TLS
//! A `rediss://` address (or `tls: true`) needs the crate's `tls` feature (the `epp` binary's
//! `redis-sync-tls`). The server's certificate is always verified, including its name
//! against the address's host (an IP address must be among the certificate's IP SANs):
//! * without `caFile`, against the public web PKI roots (a managed Redis with a public
//!   certificate);
//! * with `caFile`, a PEM bundle, against those CAs **instead of** the public roots. An
//!   in-cluster Redis has a certificate from a private CA (cert-manager, the Bitnami and
//!   Valkey charts), and trusting that CA alone means that no certificate some public CA
//!   issued for the same name is accepted.
//!
//! `certFile` and `keyFile` (PEM, given together) present a client certificate, for a server
//! with `tls-auth-clients yes`. There is no option to skip verification: give `caFile` with
//! the CA that signed the server's certificate. The files are read, parsed and checked (the
//! key must be the certificate's) when the configuration is loaded, so a wrong path or file
//! fails the start rather than every connection; the key never appears in logs or `Debug`
//! output. Mounted secrets that are rotated take effect on a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use scheduler_core::data_layer::DataLayerPlugin;
use scheduler_core::{Plugin, PluginError, PluginRegistry};
use serde::Deserialize;

/// The plugin's type name.
pub const TYPE_NAME: &str = "redis-cross-replica-syncer";
/// llm-d's default `crossReplicaSyncInterval`.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(200);
/// Default Redis address.
pub const DEFAULT_ADDRESS: &str = "redis://127.0.0.1:6379";
/// Default key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "epp";
/// Default cap of the prefix-record stream, in batches (`XADD MAXLEN ~`).
pub const DEFAULT_STREAM_MAX_LEN: usize = 10_000;
/// Default cap of the snapshot a starting replica replays, in batches.
pub const DEFAULT_SNAPSHOT_BATCHES: usize = 2_000;
/// Default bound of the outbound queue, in block hashes (512 KiB).
pub const DEFAULT_MAX_QUEUED_BLOCKS: usize = 64 * 1024;

/// The plugin's parameters as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SyncerParameters {
    /// `host:port` or a `redis://` / `rediss://` URL (default `redis://127.0.0.1:6379`).
    pub address: Option<String>,
    /// TLS to Redis (also implied by a `rediss://` address).
    pub tls: Option<bool>,
    /// ACL user name.
    pub username: Option<String>,
    /// A file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Prefix of every key (default `epp`).
    pub key_prefix: Option<String>,
    /// The pool name in keys and messages (default: the picker's pool name), so that several
    /// pools share one Redis.
    pub pool_name: Option<String>,
    /// Sync interval when `dataLayer.crossReplicaSyncInterval` is absent (`200ms`, `1s`).
    pub sync_interval: Option<String>,
    /// How long a replica's in-flight counts outlive its last publication (default 3 ×
    /// the interval, at least 1 s).
    pub in_flight_ttl: Option<String>,
    /// This replica's id (default: host name, process id and a random suffix).
    pub replica_id: Option<String>,
    /// Cap of the prefix-record stream in batches (default 10000).
    pub stream_max_len: Option<usize>,
    /// Batches a starting replica replays (default 2000).
    pub snapshot_batches: Option<usize>,
    /// Bound of the outbound queue in block hashes (default 65536).
    pub max_queued_blocks: Option<usize>,
    /// TLS: a PEM bundle of the CA certificates that verify the server, trusted instead of
    /// the public roots.
    pub ca_file: Option<PathBuf>,
    /// TLS: a PEM client certificate (chain) for mutual TLS; needs `keyFile`.
    pub cert_file: Option<PathBuf>,
    /// TLS: the PEM private key of `certFile`.
    pub key_file: Option<PathBuf>,
}

/// Certificates for TLS to Redis (PEM), as read from `caFile`, `certFile` and `keyFile`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificates that verify the server; when set, the only ones trusted.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and its key, for servers that authenticate clients.
    pub client: Option<ClientIdentity>,
}

impl TlsSettings {
    /// Whether anything is set (otherwise a `rediss://` client trusts the public roots and
    /// presents no certificate).
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca", &self.ca.as_ref().map(|pem| format!("<{} bytes>", pem.len())))
            .field("client", &self.client)
            .finish()
    }
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate, then any intermediates.
    pub cert_chain: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_chain", &format!("<{} bytes>", self.cert_chain.len()))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Validated settings of one syncer.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// Redis URL (`redis://` or `rediss://`).
    pub url: String,
    /// ACL user name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Key prefix.
    pub key_prefix: String,
    /// Pool name, when the parameters give one.
    pub pool_name: Option<String>,
    /// Sync interval from the parameters.
    pub interval: Option<Duration>,
    /// In-flight TTL from the parameters.
    pub in_flight_ttl: Option<Duration>,
    /// Replica id from the parameters.
    pub replica_id: Option<String>,
    /// Stream cap in batches.
    pub stream_max_len: usize,
    /// Snapshot cap in batches.
    pub snapshot_batches: usize,
    /// Outbound queue bound in hashes.
    pub max_queued_blocks: usize,
    /// TLS certificates (used with a `rediss://` URL only).
    pub tls: TlsSettings,
}

impl std::fmt::Debug for SyncSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("key_prefix", &self.key_prefix)
            .field("pool_name", &self.pool_name)
            .field("interval", &self.interval)
            .field("in_flight_ttl", &self.in_flight_ttl)
            .field("replica_id", &self.replica_id)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl SyncSettings {
    /// Settings for a Redis at `url` with every default (for tests and embedders).
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            pool_name: None,
            interval: None,
            in_flight_ttl: None,
            replica_id: None,
            stream_max_len: DEFAULT_STREAM_MAX_LEN,
            snapshot_batches: DEFAULT_SNAPSHOT_BATCHES,
            max_queued_blocks: DEFAULT_MAX_QUEUED_BLOCKS,
            tls: TlsSettings::default(),
        }
    }
}

fn invalid(message: impl Into<String>) -> PluginError {
    PluginError::InvalidParameters(message.into())
}

impl SyncerParameters {
    /// Checks the parameters and reads the password (from its file or variable).
    pub fn resolve(&self) -> Result<SyncSettings, PluginError> {
        let address = self.address.as_deref().unwrap_or(DEFAULT_ADDRESS).trim();
        if address.is_empty() {
            return Err(invalid("address: empty"));
        }
        let (scheme, rest) = match address.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("redis", address),
        };
        let tls = match (scheme, self.tls) {
            ("redis", tls) => tls.unwrap_or(false),
            ("rediss", Some(false)) => {
                return Err(invalid("tls: false contradicts the rediss:// address"));
            }
            ("rediss", _) => true,
            (other, _) => {
                return Err(invalid(format!(
                    "address: scheme '{other}' is not redis:// or rediss://"
                )));
            }
        };
        let tls_files =
            [("caFile", &self.ca_file), ("certFile", &self.cert_file), ("keyFile", &self.key_file)]
                .into_iter()
                .filter(|(_, path)| path.is_some())
                .map(|(name, _)| name)
                .collect::<Vec<_>>();
        if !tls && !tls_files.is_empty() {
            return Err(invalid(format!(
                "{}: TLS parameters, but the address is not rediss:// (nor tls: true)",
                tls_files.join(", ")
            )));
        }
        if tls && !cfg!(feature = "tls") {
            return Err(invalid(
                "tls: this build has no TLS client for Redis (build epp-redis-sync with its `tls` feature; the epp binary with `redis-sync-tls`)",
            ));
        }
        // The redis client's own `#insecure` switch is not compiled in; refuse it here, where
        // the message can say what to do instead, rather than on every connection attempt.
        if rest.contains('#') {
            return Err(invalid(
                "address: URL fragments such as #insecure are not supported (give caFile to trust a private CA)",
            ));
        }
        let url = format!("{}://{rest}", if tls { "rediss" } else { "redis" });
        let tls_settings = self.read_tls_files()?;
        let password = match (&self.password_file, &self.password_env) {
            (Some(_), Some(_)) => {
                return Err(invalid("passwordFile and passwordEnv: give one or the other"));
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    invalid(format!("passwordFile: cannot read {}: {error}", path.display()))
                })?;
                Some(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, Some(name)) => Some(std::env::var(name).map_err(|_| {
                invalid(format!("passwordEnv: the environment variable '{name}' is not set"))
            })?),
            (None, None) => None,
        };
        let interval = self
            .sync_interval
            .as_deref()
            .map(|text| parse_duration(text).map_err(|e| invalid(format!("syncInterval: {e}"))))
            .transpose()?;
        let in_flight_ttl = self
            .in_flight_ttl
            .as_deref()
            .map(|text| parse_duration(text).map_err(|e| invalid(format!("inFlightTtl: {e}"))))
            .transpose()?;
        let positive = |value: Option<usize>, default: usize, name: &str| match value {
            Some(0) => Err(invalid(format!("{name}: must be at least 1"))),
            Some(value) => Ok(value),
            None => Ok(default),
        };
        let key_prefix = self.key_prefix.clone().unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
        for (name, value) in [
            ("keyPrefix", Some(&key_prefix)),
            ("poolName", self.pool_name.as_ref()),
            ("replicaId", self.replica_id.as_ref()),
        ] {
            if let Some(value) = value
                && (value.is_empty() || value.len() > crate::wire::MAX_NAME_BYTES)
            {
                return Err(invalid(format!("{name}: must be 1 to 255 bytes")));
            }
        }
        Ok(SyncSettings {
            url,
            username: self.username.clone(),
            password,
            key_prefix,
            pool_name: self.pool_name.clone(),
            interval,
            in_flight_ttl,
            replica_id: self.replica_id.clone(),
            stream_max_len: positive(self.stream_max_len, DEFAULT_STREAM_MAX_LEN, "streamMaxLen")?,
            snapshot_batches: positive(
                self.snapshot_batches,
                DEFAULT_SNAPSHOT_BATCHES,
                "snapshotBatches",
            )?,
            max_queued_blocks: positive(
                self.max_queued_blocks,
                DEFAULT_MAX_QUEUED_BLOCKS,
                "maxQueuedBlocks",
            )?,
            tls: tls_settings,
        })
    }

    /// Reads and checks `caFile`, `certFile` and `keyFile` (only reached with TLS on).
    #[cfg(feature = "tls")]
    fn read_tls_files(&self) -> Result<TlsSettings, PluginError> {
        let ca = self
            .ca_file
            .as_deref()
            .map(|path| {
                let pem = read_file("caFile", path)?;
                let certificates = parse_certificates("caFile", path, &pem)?;
                let mut roots = rustls::RootCertStore::empty();
                for (position, certificate) in certificates.into_iter().enumerate() {
                    roots.add(certificate).map_err(|error| {
                        invalid(format!(
                            "caFile: certificate {} of {} is not a usable CA certificate: {error}",
                            position + 1,
                            path.display()
                        ))
                    })?;
                }
                Ok::<_, PluginError>(pem)
            })
            .transpose()?;
        let client = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("certFile: needs keyFile (the certificate's key)"));
            }
            (None, Some(_)) => return Err(invalid("keyFile: needs certFile (its certificate)")),
            (Some(cert_path), Some(key_path)) => {
                use rustls::pki_types::PrivateKeyDer;
                use rustls::pki_types::pem::PemObject;
                let cert_chain = read_file("certFile", cert_path)?;
                let certificates = parse_certificates("certFile", cert_path, &cert_chain)?;
                let key = read_file("keyFile", key_path)?;
                let parsed = PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
                    invalid(format!(
                        "keyFile: {} holds no PEM private key: {error}",
                        key_path.display()
                    ))
                })?;
                // The same check the TLS client makes when it connects, made once here so
                // that a key that is not the certificate's stops the start with a clear
                // message instead of failing every connection.
                let provider = rustls::crypto::ring::default_provider();
                rustls::sign::CertifiedKey::from_der(certificates, parsed, &provider).map_err(
                    |error| {
                        invalid(format!(
                            "certFile, keyFile: {} and {} are not a usable certificate and key: {error}",
                            cert_path.display(),
                            key_path.display()
                        ))
                    },
                )?;
                Some(ClientIdentity { cert_chain, key })
            }
        };
        Ok(TlsSettings { ca, client })
    }

    /// Without the `tls` feature, `resolve` has refused TLS before this is reached.
    #[cfg(not(feature = "tls"))]
    fn read_tls_files(&self) -> Result<TlsSettings, PluginError> {
        Ok(TlsSettings::default())
    }
}

/// Reads the file a parameter names.
#[cfg(feature = "tls")]
fn read_file(parameter: &str, path: &std::path::Path) -> Result<Vec<u8>, PluginError> {
    std::fs::read(path)
        .map_err(|error| invalid(format!("{parameter}: cannot read {}: {error}", path.display())))
}

/// The PEM certificates in `pem`, at least one.
#[cfg(feature = "tls")]
fn parse_certificates(
    parameter: &str,
    path: &std::path::Path,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, PluginError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("{parameter}: {} is not PEM: {error}", path.display())))?;
    if certificates.is_empty() {
        return Err(invalid(format!(
            "{parameter}: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certificates)
}

/// Parses `250ms`, `2s`, `1m` or `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("'{text}' is not a duration"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("'{text}': unit must be ms, s or m")),
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!("'{text}' is not between 0 and 1h"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Registers `redis-cross-replica-syncer` in `registry`: a data-layer plugin in the
/// cross-replica-syncer role whose [`shared`](Plugin::shared) value is its [`SyncSettings`].
pub fn register(registry: &mut PluginRegistry) {
    registry.register(TYPE_NAME, |spec| {
        let parameters: SyncerParameters = spec.parameters()?;
        let settings = parameters.resolve()?;
        Ok(Plugin {
            data_layer: Some(Arc::new(DataLayerPlugin::CrossReplicaSyncer)),
            shared: Some(Arc::new(settings)),
            ..Plugin::default()
        })
    });
}

/// The settings of the syncer plugin named `name` among `plugins`.
pub fn settings_of(
    plugins: &scheduler_core::ConstructedPlugins,
    name: &str,
) -> Option<Arc<SyncSettings>> {
    plugins.get(name)?.plugin.shared.clone()?.downcast::<SyncSettings>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resolve(value: serde_json::Value) -> Result<SyncSettings, String> {
        let spec = scheduler_core::PluginSpec {
            parameters: Some(&value),
            ..scheduler_core::PluginSpec::of_type(TYPE_NAME)
        };
        spec.parameters::<SyncerParameters>()
            .and_then(|p| p.resolve())
            .map_err(|error| error.to_string())
    }

    #[test]
    fn defaults_and_addresses() {
        let settings = resolve(json!({})).unwrap();
        assert_eq!(settings.url, DEFAULT_ADDRESS);
        assert_eq!(settings.key_prefix, "epp");
        assert_eq!(
            resolve(json!({"address": "10.0.0.1:6380"})).unwrap().url,
            "redis://10.0.0.1:6380"
        );
        let timing = resolve(json!({"syncInterval": "50ms", "inFlightTtl": "2s"})).unwrap();
        assert_eq!(timing.interval, Some(Duration::from_millis(50)));
        assert_eq!(timing.in_flight_ttl, Some(Duration::from_secs(2)));
    }

    #[test]
    fn bad_parameters_are_named() {
        let error = resolve(json!({"adress": "x"})).unwrap_err();
        assert!(error.contains("unknown field `adress`"), "{error}");
        assert!(resolve(json!({"address": "http://x"})).unwrap_err().contains("scheme 'http'"));
        assert!(resolve(json!({"syncInterval": "soon"})).unwrap_err().contains("syncInterval"));
        assert!(resolve(json!({"streamMaxLen": 0})).unwrap_err().contains("streamMaxLen"));
        let both = resolve(json!({"passwordFile": "/x", "passwordEnv": "Y"})).unwrap_err();
        assert!(both.contains("one or the other"), "{both}");
        let missing = resolve(json!({"passwordEnv": "EPP_REDIS_SYNC_TEST_UNSET"})).unwrap_err();
        assert!(missing.contains("'EPP_REDIS_SYNC_TEST_UNSET' is not set"), "{missing}");
        let file = resolve(json!({"passwordFile": "/nonexistent/pw"})).unwrap_err();
        assert!(file.contains("passwordFile: cannot read /nonexistent/pw"), "{file}");
        if !cfg!(feature = "tls") {
            assert!(resolve(json!({"tls": true})).unwrap_err().contains("`tls` feature"));
        }
    }

    #[test]
    fn tls_files_need_a_tls_address_and_a_tls_build() {
        for parameters in [
            json!({"caFile": "/x/ca.crt"}),
            json!({"address": "redis://r:6379", "certFile": "/c", "keyFile": "/k"}),
            json!({"address": "r:6379", "tls": false, "keyFile": "/k"}),
        ] {
            let error = resolve(parameters.clone()).unwrap_err();
            assert!(error.contains("not rediss://"), "{parameters}: {error}");
        }
        let error = resolve(json!({"address": "redis://r", "certFile": "/c", "keyFile": "/k"}))
            .unwrap_err();
        assert!(error.contains("certFile, keyFile: TLS parameters"), "{error}");
        let on_tls = resolve(json!({"address": "rediss://r:6379", "caFile": "/nonexistent/ca"}));
        if cfg!(feature = "tls") {
            let error = on_tls.unwrap_err();
            assert!(error.contains("caFile: cannot read /nonexistent/ca"), "{error}");
        } else {
            assert!(on_tls.unwrap_err().contains("`tls` feature"));
        }
        // Without the feature a rediss:// address is refused before its fragment is looked at.
        let scheme = if cfg!(feature = "tls") { "rediss" } else { "redis" };
        let insecure =
            resolve(json!({"address": format!("{scheme}://r:6379/#insecure")})).unwrap_err();
        assert!(insecure.contains("#insecure") && insecure.contains("caFile"), "{insecure}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_files_are_checked_when_read() {
        let dir = std::env::temp_dir().join(format!("epp-redis-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let text = file("text", "not a certificate\n");
        let truncated = file("truncated", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let garbage =
            file("garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let tls = |parameters: serde_json::Value| {
            let mut parameters = parameters;
            parameters["address"] = json!("rediss://redis:6380");
            resolve(parameters).unwrap_err()
        };
        let error = tls(json!({"caFile": text}));
        assert!(error.contains(&format!("caFile: {text} holds no PEM certificate")), "{error}");
        let error = tls(json!({"caFile": truncated}));
        assert!(error.contains(&format!("caFile: {truncated} is not PEM")), "{error}");
        let error = tls(json!({"caFile": garbage}));
        assert!(
            error.contains("caFile: certificate 1 of") && error.contains("usable CA"),
            "{error}"
        );
        let error = tls(json!({"certFile": text}));
        assert!(error.contains("certFile: needs keyFile"), "{error}");
        let error = tls(json!({"keyFile": text}));
        assert!(error.contains("keyFile: needs certFile"), "{error}");
        let error = tls(json!({"certFile": "/nonexistent/tls.crt", "keyFile": text}));
        assert!(error.contains("certFile: cannot read /nonexistent/tls.crt"), "{error}");
        let error = tls(json!({"certFile": garbage, "keyFile": text}));
        assert!(error.contains(&format!("keyFile: {text} holds no PEM private key")), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_output_names_no_key_material() {
        let mut settings = SyncSettings::for_url("rediss://r:6380");
        settings.tls = TlsSettings {
            ca: Some(b"CA-MATERIAL".to_vec()),
            client: Some(ClientIdentity {
                cert_chain: b"CERT-MATERIAL".to_vec(),
                key: b"KEY-MATERIAL".to_vec(),
            }),
        };
        let printed = format!("{settings:?}");
        for secret in ["CA-MATERIAL", "CERT-MATERIAL", "KEY-MATERIAL"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("key: \"<redacted>\""), "{printed}");
        assert!(printed.contains("ca: Some(\"<11 bytes>\")"), "{printed}");
    }

    #[test]
    fn password_file_is_read_without_its_newline() {
        let path = std::env::temp_dir().join(format!("epp-redis-pw-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let settings = resolve(json!({"passwordFile": path})).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(settings.password.as_deref(), Some("s3cret"));
        assert!(!format!("{settings:?}").contains("s3cret"), "the password is not printed");
    }
}
