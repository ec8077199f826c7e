//! A static pool from a file: the endpoints, in YAML or JSON, reloaded when it changes.
//!
//! Two shapes are read. This server's own, a list:
//!
//! ```yaml
//! - address: 10.0.0.1
//!   port: 8000
//!   name: vllm-0            # optional, defaults to address:port
//!   engine: vllm            # optional: vllm | sglang | trtllm
//!   role: decode            # optional: llm-d's llm-d.ai/role values (see below)
//!   labels: {tier: gold}    # optional
//! ```
//!
//! and the Go EPP's `file-discovery` file, a mapping whose `endpoints` holds the list, with
//! the port as a string and an optional `namespace` (kept as the label
//! [`NAMESPACE_LABEL`]):
//!
//! ```yaml
//! endpoints:
//!   - name: vllm-0
//!     address: "10.0.0.1"
//!     port: "8000"
//! ```
//!
//! An address is an IP literal or a DNS name (a peer cluster's gateway, for
//! `multicluster-file-discovery`). A name is resolved when the file is loaded and again every
//! [`DNS_REFRESH`]; an entry whose name does not resolve is left out (and logged) until it
//! does, so one unreachable cluster does not stop the others.
//!
//! `role` is the endpoint's part in disaggregated serving, with the values of llm-d's
//! `llm-d.ai/role` pod label: `prefill`, `decode`, `encode`, `prefill-decode` (or its old
//! spelling `both`), `encode-prefill`, `encode-prefill-decode`. It is written as that label
//! (so `labels: {llm-d.ai/role: decode}` says the same). An endpoint without a role counts as
//! llm-d counts an unlabelled pod: decode only (`decode-filter` keeps it, `prefill-filter` and
//! `encode-filter` do not), which serves every request aggregated when no profile filters.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use scheduler_core::{Endpoint, EndpointRole, ROLE_LABEL};
use serde::Deserialize;

/// How often the DNS names of a file are resolved again, so a gateway that moves is followed.
pub const DNS_REFRESH: Duration = Duration::from_secs(30);
/// The label an entry's `namespace` becomes.
pub const NAMESPACE_LABEL: &str = "namespace";
/// Largest endpoints file read (the Go EPP's bound too).
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// Where an entry says its endpoint is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryAddress {
    /// An IP literal.
    Ip(IpAddr),
    /// A DNS name, resolved when the file is applied.
    Host(String),
}

impl<'de> Deserialize<'de> for EntryAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        if is_dns_name(&text) {
            return Ok(Self::Host(text));
        }
        Err(serde::de::Error::custom(format!(
            "address {text:?} is neither an IP address nor a DNS name"
        )))
    }
}

impl std::fmt::Display for EntryAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Host(host) => f.write_str(host),
        }
    }
}

/// Whether `text` is a DNS-1123 subdomain: dot-separated labels of lower-case letters, digits
/// and inner hyphens, 63 bytes a label, 253 in all.
fn is_dns_name(text: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    !text.is_empty() && text.len() <= 253 && text.split('.').all(label_ok)
}

/// A port written as a number (this server's files) or a string (the Go EPP's).
fn port<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(u64),
        Text(String),
    }
    let invalid = |shown: String| serde::de::Error::custom(format!("port {shown} is not 1-65535"));
    let number = match Written::deserialize(deserializer)? {
        Written::Number(number) => number,
        Written::Text(text) => text.trim().parse().map_err(|_| invalid(format!("{text:?}")))?,
    };
    match u16::try_from(number) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(invalid(number.to_string())),
    }
}

/// One entry of the endpoints file, as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredEntry {
    /// IP address or DNS name.
    pub address: EntryAddress,
    /// Port of the model server (or of the peer cluster's gateway).
    #[serde(deserialize_with = "port")]
    pub port: u16,
    /// Name for logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// Namespace (the Go file's field), kept as a label.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Model-server engine, for metric names.
    #[serde(default)]
    pub engine: Option<String>,
    /// Role in prefill/decode disaggregation.
    #[serde(default)]
    pub role: Option<RoleName>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One endpoint of the file, its address resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointEntry {
    /// IP address.
    pub address: IpAddr,
    /// The DNS name `address` was resolved from, when the file gave one.
    pub host: Option<String>,
    /// Port of the model server.
    pub port: u16,
    /// Name for logs and metrics.
    pub name: Option<String>,
    /// Model-server engine, for metric names.
    pub engine: Option<String>,
    /// Role in prefill/decode disaggregation.
    pub role: Option<RoleName>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Role names accepted in the file: llm-d's `llm-d.ai/role` values.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RoleName {
    /// Prefill and decode (llm-d's deprecated spelling of `prefill-decode`).
    Both,
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
    /// Encode (multimodal inputs) only.
    Encode,
    /// Prefill and decode.
    PrefillDecode,
    /// Encode and prefill.
    EncodePrefill,
    /// Every stage.
    EncodePrefillDecode,
}

impl RoleName {
    /// The role it names.
    pub fn role(self) -> EndpointRole {
        match self {
            Self::Both | Self::PrefillDecode => EndpointRole::PrefillDecode,
            Self::Prefill => EndpointRole::Prefill,
            Self::Decode => EndpointRole::Decode,
            Self::Encode => EndpointRole::Encode,
            Self::EncodePrefill => EndpointRole::EncodePrefill,
            Self::EncodePrefillDecode => EndpointRole::EncodePrefillDecode,
        }
    }
}

impl DeclaredEntry {
    /// The entry at `ip` (its own address, or what its name resolved to).
    pub fn at(&self, ip: IpAddr) -> EndpointEntry {
        let mut labels = self.labels.clone();
        if let Some(namespace) = &self.namespace {
            labels.entry(NAMESPACE_LABEL.to_owned()).or_insert_with(|| namespace.clone());
        }
        let host = match &self.address {
            EntryAddress::Ip(_) => None,
            EntryAddress::Host(host) => Some(host.clone()),
        };
        EndpointEntry {
            address: ip,
            host,
            port: self.port,
            name: self.name.clone(),
            engine: self.engine.clone(),
            role: self.role,
            labels,
        }
    }

    /// The address and port as written, for messages.
    fn shown_address(&self) -> String {
        match &self.address {
            EntryAddress::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            EntryAddress::Host(host) => format!("{host}:{}", self.port),
        }
    }

    /// The entry, when its address is an IP literal (no resolution needed).
    pub fn literal(&self) -> Option<EndpointEntry> {
        match self.address {
            EntryAddress::Ip(ip) => Some(self.at(ip)),
            EntryAddress::Host(_) => None,
        }
    }
}

impl EndpointEntry {
    /// The endpoint this entry describes.
    pub fn to_endpoint(&self) -> Endpoint {
        let address = SocketAddr::new(self.address, self.port);
        let mut endpoint = Endpoint::new(address);
        match (&self.name, &self.host) {
            (Some(name), _) => endpoint = endpoint.with_name(name.as_str()),
            (None, Some(host)) => endpoint = endpoint.with_name(format!("{host}:{}", self.port)),
            (None, None) => {}
        }
        if let Some(host) = &self.host {
            endpoint = endpoint.with_host(host.as_str());
        }
        endpoint.labels = self.labels.clone();
        match self.role {
            Some(role) => endpoint.with_role(role.role()),
            None => endpoint,
        }
    }
}

/// Why the endpoints file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointsFileError {
    /// The file could not be read.
    #[error("cannot read endpoints file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The content is not a list of endpoints.
    #[error("endpoints file {path} is not a list of endpoints: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// An entry's `role` and its `llm-d.ai/role` label say different things.
    #[error(
        "endpoints file {path}: {address} has role '{role}' but its label {ROLE_LABEL} is '{label}'"
    )]
    RoleConflict {
        /// The file.
        path: PathBuf,
        /// The entry's address.
        address: String,
        /// The `role` field's role.
        role: String,
        /// The label's value.
        label: String,
    },
    /// Two entries share an address.
    #[error("endpoints file {path} lists {address} twice")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// The address, as written, with its port.
        address: String,
    },
}

/// The two shapes of the file.
#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    List(Vec<DeclaredEntry>),
    Wrapped(Wrapped),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    endpoints: Vec<DeclaredEntry>,
}

/// Parses endpoints file content (YAML, of which JSON is a subset).
pub fn parse(path: &Path, text: &str) -> Result<Vec<DeclaredEntry>, EndpointsFileError> {
    let parse_error =
        |message: String| EndpointsFileError::Parse { path: path.to_owned(), message };
    // Untagged enums hide the inner error, so the shape is chosen first and then parsed for
    // a message that names the field at fault.
    let first_line =
        text.lines().map(str::trim).find(|line| !line.is_empty() && !line.starts_with('#'));
    let wrapped =
        first_line.is_some_and(|line| line.starts_with("endpoints") || line.starts_with('{'));
    let entries = if wrapped {
        serde_saphyr::from_str::<Wrapped>(text).map(|document| document.endpoints)
    } else {
        serde_saphyr::from_str::<Vec<DeclaredEntry>>(text)
    };
    let entries = match entries {
        Ok(entries) => entries,
        Err(error) => match serde_saphyr::from_str::<Document>(text) {
            Ok(Document::List(entries)) => entries,
            Ok(Document::Wrapped(document)) => document.endpoints,
            Err(_) => return Err(parse_error(error.to_string())),
        },
    };
    let mut seen = HashSet::new();
    for entry in &entries {
        if !seen.insert((&entry.address, entry.port)) {
            let address = entry.shown_address();
            return Err(EndpointsFileError::Duplicate { path: path.to_owned(), address });
        }
        if let (Some(role), Some(label)) = (entry.role, entry.labels.get(ROLE_LABEL))
            && EndpointRole::from_label(Some(label)) != role.role()
        {
            return Err(EndpointsFileError::RoleConflict {
                path: path.to_owned(),
                address: entry.shown_address(),
                role: role.role().label_value().unwrap_or_default().to_owned(),
                label: label.clone(),
            });
        }
    }
    Ok(entries)
}

/// Parses the raw bytes of an endpoints file, which must be UTF-8 text.
pub fn parse_bytes(path: &Path, content: &[u8]) -> Result<Vec<DeclaredEntry>, EndpointsFileError> {
    if content.len() > MAX_FILE_BYTES {
        return Err(EndpointsFileError::Parse {
            path: path.to_owned(),
            message: format!("larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    let text = std::str::from_utf8(content).map_err(|error| EndpointsFileError::Parse {
        path: path.to_owned(),
        message: format!("not UTF-8 text ({error})"),
    })?;
    parse(path, text)
}

/// The entries with their names resolved. An entry whose name does not resolve is logged and
/// left out; an entry resolving to an address already taken is logged and left out.
pub async fn resolve(declared: &[DeclaredEntry]) -> Vec<EndpointEntry> {
    let mut entries = Vec::with_capacity(declared.len());
    let mut taken = HashSet::new();
    for entry in declared {
        let ip = match &entry.address {
            EntryAddress::Ip(ip) => *ip,
            EntryAddress::Host(host) => match lookup(host, entry.port).await {
                Ok(ip) => ip,
                Err(error) => {
                    tracing::warn!(%host, %error, "endpoint name does not resolve; left out until it does");
                    continue;
                }
            },
        };
        if !taken.insert(SocketAddr::new(ip, entry.port)) {
            tracing::warn!(address = %entry.address, %ip, port = entry.port, "endpoint resolves to an address already listed; left out");
            continue;
        }
        entries.push(entry.at(ip));
    }
    entries
}

/// The first address `host` resolves to, IPv4 preferred (pod networks and gateways are
/// mostly IPv4, and a dual-stack name's IPv6 address may not be routable here).
async fn lookup(host: &str, port: u16) -> std::io::Result<IpAddr> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .map(SocketAddr::ip)
        .ok_or_else(|| std::io::Error::other("no address"))
}

/// The file as read, with the entries it holds; the content lets a watcher tell a change
/// from a rewrite of the same bytes.
#[derive(Debug)]
pub struct LoadedFile {
    /// The bytes read.
    pub content: Vec<u8>,
    /// The entries parsed from them, names resolved.
    pub entries: Vec<EndpointEntry>,
}

/// Reads (without blocking a runtime thread), parses and resolves the file.
pub async fn load(path: &Path) -> Result<LoadedFile, EndpointsFileError> {
    let content = tokio::fs::read(path)
        .await
        .map_err(|source| EndpointsFileError::Read { path: path.to_owned(), source })?;
    let entries = resolve(&parse_bytes(path, &content)?).await;
    Ok(LoadedFile { content, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(entries: &[DeclaredEntry]) -> Vec<EndpointEntry> {
        entries.iter().map(|entry| entry.literal().unwrap()).collect()
    }

    #[test]
    fn yaml_and_json_lists_parse() {
        let path = Path::new("pool.yaml");
        let entries = parse(
            path,
            "- address: 10.0.0.1\n  port: 8000\n  engine: sglang\n  role: decode\n  labels: {tier: gold}\n",
        )
        .unwrap();
        let endpoint = literal(&entries)[0].to_endpoint();
        assert_eq!(endpoint.address, "10.0.0.1:8000".parse().unwrap());
        assert_eq!(endpoint.role(), EndpointRole::Decode);
        assert_eq!(endpoint.labels[ROLE_LABEL], "decode", "the role is the llm-d label");
        assert_eq!(endpoint.labels["tier"], "gold");
        assert_eq!(endpoint.host, None);
        assert_eq!(entries[0].engine.as_deref(), Some("sglang"));
        let json = parse(path, r#"[{"address":"::1","port":9,"name":"local"}]"#).unwrap();
        assert_eq!(&*literal(&json)[0].to_endpoint().name, "local");
    }

    #[test]
    fn the_go_file_discovery_shape_parses() {
        let path = Path::new("endpoints.yaml");
        let text = "endpoints:\n  - name: vllm-0\n    namespace: prod\n    address: \"10.0.0.1\"\n    port: \"8000\"\n    labels: {tier: gold}\n  - name: vllm-1\n    address: \"10.0.0.2\"\n    port: \"8000\"\n";
        let entries = literal(&parse(path, text).unwrap());
        assert_eq!(entries.len(), 2);
        let first = entries[0].to_endpoint();
        assert_eq!(first.address, "10.0.0.1:8000".parse().unwrap());
        assert_eq!(&*first.name, "vllm-0");
        assert_eq!(first.labels[NAMESPACE_LABEL], "prod");
        assert_eq!(first.labels["tier"], "gold");
        let json = r#"{"endpoints":[{"name":"a","address":"10.0.0.3","port":"9000"}]}"#;
        assert_eq!(literal(&parse(path, json).unwrap())[0].port, 9000);
        let error = parse(path, "endpoints:\n  - {name: a, address: 10.0.0.1, port: \"http\"}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("port \"http\" is not 1-65535"), "{error}");
        let error = parse(path, "endpoints:\n  - {name: a, address: 10.0.0.1, port: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("port 0 is not 1-65535"), "{error}");
    }

    #[test]
    fn addresses_are_ip_literals_or_dns_names() {
        let path = Path::new("clusters.yaml");
        let entries = parse(path, "- {address: gw.cluster-a.example.com, port: 443}\n").unwrap();
        assert_eq!(entries[0].address, EntryAddress::Host("gw.cluster-a.example.com".into()));
        assert_eq!(entries[0].literal(), None);
        let resolved = entries[0].at("10.1.2.3".parse().unwrap()).to_endpoint();
        assert_eq!(resolved.host.as_deref(), Some("gw.cluster-a.example.com"));
        assert_eq!(&*resolved.name, "gw.cluster-a.example.com:443");
        for bad in ["Gw.Example.com", "-gw.example.com", "gw..example.com", "gw_a.example.com"] {
            let error = parse(path, &format!("- {{address: \"{bad}\", port: 443}}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("neither an IP address nor a DNS name"), "{bad}: {error}");
        }
    }

    #[test]
    fn roles_take_llm_d_values_and_no_role_is_decode_only() {
        let path = Path::new("pool.yaml");
        let text = "\
- {address: 10.0.0.1, port: 1, role: both}
- {address: 10.0.0.1, port: 2, role: encode-prefill}
- {address: 10.0.0.1, port: 3}
- {address: 10.0.0.1, port: 4, labels: {llm-d.ai/role: prefill}}
- {address: 10.0.0.1, port: 5, role: prefill, labels: {llm-d.ai/role: prefill}}
";
        let roles: Vec<EndpointRole> = literal(&parse(path, text).unwrap())
            .iter()
            .map(|entry| entry.to_endpoint().role())
            .collect();
        assert_eq!(
            roles,
            [
                EndpointRole::PrefillDecode,
                EndpointRole::EncodePrefill,
                EndpointRole::Unlabeled,
                EndpointRole::Prefill,
                EndpointRole::Prefill,
            ]
        );
        assert!(roles[2].serves_decode() && !roles[2].serves_prefill());

        let error = parse(path, "- {address: 10.0.0.1, port: 1, role: prefil}\n").unwrap_err();
        assert!(error.to_string().contains("prefil"), "{error}");
        let conflict =
            "- {address: 10.0.0.1, port: 1, role: decode, labels: {llm-d.ai/role: prefill}}\n";
        assert_eq!(
            parse(path, conflict).unwrap_err().to_string(),
            "endpoints file pool.yaml: 10.0.0.1:1 has role 'decode' but its label llm-d.ai/role is 'prefill'"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let path = Path::new("pool.yaml");
        let error = parse(path, "- address: no_pe\n  port: 1\n").unwrap_err().to_string();
        assert!(
            error.starts_with("endpoints file pool.yaml is not a list of endpoints:"),
            "{error}"
        );
        let error =
            parse(path, "- {address: 10.0.0.1, port: 1, weight: 3}\n").unwrap_err().to_string();
        assert!(error.contains("weight"), "{error}");
        let error = parse(path, "- {address: 10.0.0.1, port: 1}\n- {address: 10.0.0.1, port: 1}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(error, "endpoints file pool.yaml lists 10.0.0.1:1 twice");
        let error = parse(path, "- {address: gw.a, port: 1}\n- {address: gw.a, port: 1}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(error, "endpoints file pool.yaml lists gw.a:1 twice");
    }

    #[test]
    fn bytes_that_are_not_text_are_refused_by_name() {
        let path = Path::new("pool.yaml");
        let error = parse_bytes(path, b"- {address: 10.0.0.1, port: 1}\n\xff").unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("endpoints file pool.yaml"), "{message}");
        assert!(message.contains("not UTF-8"), "{message}");
        assert_eq!(parse_bytes(path, b"- {address: 10.0.0.1, port: 1}\n").unwrap().len(), 1);
        let huge = vec![b' '; MAX_FILE_BYTES + 1];
        assert!(parse_bytes(path, &huge).unwrap_err().to_string().contains("larger than"));
    }

    #[tokio::test]
    async fn names_resolve_and_unresolvable_ones_are_left_out() {
        let path = Path::new("clusters.yaml");
        let declared = parse(
            path,
            "- {address: localhost, port: 8443}\n- {address: no-such-host.invalid, port: 443}\n- {address: 127.0.0.1, port: 8443}\n",
        )
        .unwrap();
        let entries = resolve(&declared).await;
        // localhost resolves to 127.0.0.1 (IPv4 preferred), so the literal repeating it is left out.
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(entries[0].host.as_deref(), Some("localhost"));
    }

    #[tokio::test]
    async fn a_missing_file_is_a_read_error_naming_it() {
        let error = load(Path::new("/nonexistent/pool.yaml")).await.unwrap_err();
        assert!(matches!(error, EndpointsFileError::Read { .. }));
        assert!(error.to_string().contains("/nonexistent/pool.yaml"), "{error}");
    }
}
