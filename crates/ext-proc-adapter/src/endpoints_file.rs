//! A static pool from a file: a YAML or JSON list of endpoints, reloaded when it changes.
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
//! `role` is the endpoint's part in disaggregated serving, with the values of llm-d's
//! `llm-d.ai/role` pod label: `prefill`, `decode`, `encode`, `prefill-decode` (or its old
//! spelling `both`), `encode-prefill`, `encode-prefill-decode`. It is written as that label
//! (so `labels: {llm-d.ai/role: decode}` says the same). An endpoint without a role counts as
//! llm-d counts an unlabelled pod: decode only (`decode-filter` keeps it, `prefill-filter` and
//! `encode-filter` do not), which serves every request aggregated when no profile filters.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use scheduler_core::{Endpoint, EndpointRole, ROLE_LABEL};
use serde::Deserialize;

/// One entry of the endpoints file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    /// IP address.
    pub address: IpAddr,
    /// Port of the model server.
    pub port: u16,
    /// Name for logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
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

impl EndpointEntry {
    /// The endpoint this entry describes.
    pub fn to_endpoint(&self) -> Endpoint {
        let address = SocketAddr::new(self.address, self.port);
        let mut endpoint = Endpoint::new(address);
        if let Some(name) = &self.name {
            endpoint = endpoint.with_name(name.as_str());
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
        address: SocketAddr,
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
        /// The address.
        address: SocketAddr,
    },
}

/// Parses endpoints file content (YAML, of which JSON is a subset).
pub fn parse(path: &Path, text: &str) -> Result<Vec<EndpointEntry>, EndpointsFileError> {
    let entries: Vec<EndpointEntry> = serde_saphyr::from_str(text).map_err(|error| {
        EndpointsFileError::Parse { path: path.to_owned(), message: error.to_string() }
    })?;
    let mut seen = std::collections::HashSet::new();
    for entry in &entries {
        let address = SocketAddr::new(entry.address, entry.port);
        if !seen.insert(address) {
            return Err(EndpointsFileError::Duplicate { path: path.to_owned(), address });
        }
        if let (Some(role), Some(label)) = (entry.role, entry.labels.get(ROLE_LABEL))
            && EndpointRole::from_label(Some(label)) != role.role()
        {
            return Err(EndpointsFileError::RoleConflict {
                path: path.to_owned(),
                address,
                role: role.role().label_value().unwrap_or_default().to_owned(),
                label: label.clone(),
            });
        }
    }
    Ok(entries)
}

/// Parses the raw bytes of an endpoints file, which must be UTF-8 text.
pub fn parse_bytes(path: &Path, content: &[u8]) -> Result<Vec<EndpointEntry>, EndpointsFileError> {
    let text = std::str::from_utf8(content).map_err(|error| EndpointsFileError::Parse {
        path: path.to_owned(),
        message: format!("not UTF-8 text ({error})"),
    })?;
    parse(path, text)
}

/// The file as read, with the entries it holds; the content lets a watcher tell a change
/// from a rewrite of the same bytes.
#[derive(Debug)]
pub struct LoadedFile {
    /// The bytes read.
    pub content: Vec<u8>,
    /// The entries parsed from them.
    pub entries: Vec<EndpointEntry>,
}

/// Reads (without blocking a runtime thread) and parses the file.
pub async fn load(path: &Path) -> Result<LoadedFile, EndpointsFileError> {
    let content = tokio::fs::read(path)
        .await
        .map_err(|source| EndpointsFileError::Read { path: path.to_owned(), source })?;
    let entries = parse_bytes(path, &content)?;
    Ok(LoadedFile { content, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_lists_parse() {
        let path = Path::new("pool.yaml");
        let entries = parse(
            path,
            "- address: 10.0.0.1\n  port: 8000\n  engine: sglang\n  role: decode\n  labels: {tier: gold}\n",
        )
        .unwrap();
        let endpoint = entries[0].to_endpoint();
        assert_eq!(endpoint.address, "10.0.0.1:8000".parse().unwrap());
        assert_eq!(endpoint.role(), EndpointRole::Decode);
        assert_eq!(endpoint.labels[ROLE_LABEL], "decode", "the role is the llm-d label");
        assert_eq!(endpoint.labels["tier"], "gold");
        assert_eq!(entries[0].engine.as_deref(), Some("sglang"));
        let json = parse(path, r#"[{"address":"::1","port":9,"name":"local"}]"#).unwrap();
        assert_eq!(&*json[0].to_endpoint().name, "local");
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
        let roles: Vec<EndpointRole> =
            parse(path, text).unwrap().iter().map(|entry| entry.to_endpoint().role()).collect();
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
        let error = parse(path, "- address: nope\n  port: 1\n").unwrap_err().to_string();
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
    }

    #[test]
    fn bytes_that_are_not_text_are_refused_by_name() {
        let path = Path::new("pool.yaml");
        let error = parse_bytes(path, b"- {address: 10.0.0.1, port: 1}\n\xff").unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("endpoints file pool.yaml"), "{message}");
        assert!(message.contains("not UTF-8"), "{message}");
        assert_eq!(parse_bytes(path, b"- {address: 10.0.0.1, port: 1}\n").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_missing_file_is_a_read_error_naming_it() {
        let error = load(Path::new("/nonexistent/pool.yaml")).await.unwrap_err();
        assert!(matches!(error, EndpointsFileError::Read { .. }));
        assert!(error.to_string().contains("/nonexistent/pool.yaml"), "{error}");
    }
}
