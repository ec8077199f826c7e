//! The `redis-cross-replica-syncer` plugin type: its parameters, their defaults and checks.
//!
//! ```yaml
//! plugins:
//! - name: sync
//!   type: redis-cross-replica-syncer
//!   parameters:
//!     address: redis://redis.epp.svc:6379   # or host:port; rediss:// or tls: true for TLS
//!     passwordEnv: REDIS_PASSWORD           # or passwordFile: /etc/redis/password
//!     keyPrefix: epp                        # default "epp"
//!     poolName: my-pool                     # default: the picker's --pool-name
//! dataLayer:
//!   crossReplicaSyncerPluginRef: sync
//!   crossReplicaSyncInterval: 200ms         # llm-d's default
//! ```
//!
//! Unknown keys are errors. The sync interval comes from `dataLayer.crossReplicaSyncInterval`
//! (llm-d's key) or, when that is absent, from the plugin's own `syncInterval`; default 200 ms.

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
        if tls && !cfg!(feature = "tls") {
            return Err(invalid(
                "tls: this build has no TLS client for Redis (build epp-redis-sync with its `tls` feature)",
            ));
        }
        let url = format!("{}://{rest}", if tls { "rediss" } else { "redis" });
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
        })
    }
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
    fn password_file_is_read_without_its_newline() {
        let path = std::env::temp_dir().join(format!("epp-redis-pw-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let settings = resolve(json!({"passwordFile": path})).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(settings.password.as_deref(), Some("s3cret"));
        assert!(!format!("{settings:?}").contains("s3cret"), "the password is not printed");
    }
}
