//! A static pool from a file: a YAML or JSON list of endpoints, reloaded when it changes.
//!
//! ```yaml
//! - address: 10.0.0.1
//!   port: 8000
//!   name: vllm-0            # optional, defaults to address:port
//!   engine: vllm            # optional: vllm | sglang | trtllm
//!   role: both              # optional: both | prefill | decode
//!   labels: {tier: gold}    # optional
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use scheduler_core::{Endpoint, EndpointRole};
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

/// Role names accepted in the file.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// Whole requests.
    Both,
    /// Prefill only.
    Prefill,
    /// Decode only.
    Decode,
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
        endpoint.role = match self.role {
            None | Some(RoleName::Both) => EndpointRole::Both,
            Some(RoleName::Prefill) => EndpointRole::Prefill,
            Some(RoleName::Decode) => EndpointRole::Decode,
        };
        endpoint
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
        assert_eq!(endpoint.role, EndpointRole::Decode);
        assert_eq!(endpoint.labels["tier"], "gold");
        assert_eq!(entries[0].engine.as_deref(), Some("sglang"));
        let json = parse(path, r#"[{"address":"::1","port":9,"name":"local"}]"#).unwrap();
        assert_eq!(&*json[0].to_endpoint().name, "local");
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
