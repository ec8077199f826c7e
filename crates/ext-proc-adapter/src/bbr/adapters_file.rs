//! The adapters file: Kubernetes ConfigMaps naming a base model and its LoRA adapters, in the
//! form the Gateway API Inference Extension documents for body-based routing.
//!
//! ```yaml
//! apiVersion: v1
//! kind: ConfigMap
//! metadata:
//!   name: llama-adapters
//!   labels:
//!     inference.networking.k8s.io/bbr-managed: "true"   # optional here
//! data:
//!   baseModel: meta-llama/Llama-3.1-8B
//!   adapters: |
//!     - sql-lora
//!     - chat-lora
//! ```
//!
//! The file holds one such object, several separated by `---`, or a `kind: List` with
//! `items` (as `kubectl get -o yaml` writes them). A ConfigMap whose `bbr-managed` label is
//! present but not `"true"` has opted out and is skipped; any other kind of object is an
//! error, as is a ConfigMap without `data.baseModel` or an adapter claimed by two base models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::base_models::AdapterMap;

/// The label by which a ConfigMap is marked for (or, set to anything but `"true"`, withheld
/// from) the body-based router.
pub const MANAGED_LABEL: &str = "inference.networking.k8s.io/bbr-managed";

/// Why the adapters file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdaptersFileError {
    /// The file could not be read.
    #[error("cannot read adapters file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML of Kubernetes objects.
    #[error("adapters file {path} is not YAML of ConfigMaps: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column when known.
        message: String,
    },
    /// An object is not a usable adapters ConfigMap.
    #[error("adapters file {path}: {object}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The object (kind and name).
        object: String,
        /// What is wrong with it.
        problem: String,
    },
    /// One adapter is listed under two base models.
    #[error(
        "adapters file {path}: adapter '{adapter}' is claimed by base models '{first}' and '{second}'"
    )]
    Conflict {
        /// The file.
        path: PathBuf,
        /// The adapter.
        adapter: String,
        /// The base model that claimed it first.
        first: String,
        /// The other base model.
        second: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct Object {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    items: Vec<Object>,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Object {
    fn describe(&self) -> String {
        let kind = self.kind.as_deref().unwrap_or("object without a kind");
        match &self.metadata.name {
            Some(name) => format!("{kind} '{name}'"),
            None => kind.to_owned(),
        }
    }
}

/// Parses adapters file content into the adapter-to-base map.
pub fn parse(path: &Path, text: &str) -> Result<AdapterMap, AdaptersFileError> {
    let documents: Vec<Option<Object>> = serde_saphyr::from_multiple(text).map_err(|error| {
        AdaptersFileError::Parse { path: path.to_owned(), message: error.to_string() }
    })?;
    let mut map = AdapterMap::default();
    for object in documents.iter().flatten() {
        match object.kind.as_deref() {
            Some("List") => {
                for item in &object.items {
                    add_config_map(path, item, &mut map)?;
                }
            }
            _ => add_config_map(path, object, &mut map)?,
        }
    }
    Ok(map)
}

/// Parses the raw bytes of an adapters file, which must be UTF-8 text.
pub fn parse_bytes(path: &Path, content: &[u8]) -> Result<AdapterMap, AdaptersFileError> {
    let text = std::str::from_utf8(content).map_err(|error| AdaptersFileError::Parse {
        path: path.to_owned(),
        message: format!("not UTF-8 text ({error})"),
    })?;
    parse(path, text)
}

/// Reads (without blocking a runtime thread) and parses the file; the content read is
/// returned too, so a watcher can tell later changes.
pub async fn load(path: &Path) -> Result<(Vec<u8>, AdapterMap), AdaptersFileError> {
    let content = tokio::fs::read(path)
        .await
        .map_err(|source| AdaptersFileError::Read { path: path.to_owned(), source })?;
    let map = parse_bytes(path, &content)?;
    Ok((content, map))
}

fn add_config_map(
    path: &Path,
    object: &Object,
    map: &mut AdapterMap,
) -> Result<(), AdaptersFileError> {
    let invalid = |problem: String| AdaptersFileError::Invalid {
        path: path.to_owned(),
        object: object.describe(),
        problem,
    };
    if object.kind.as_deref() != Some("ConfigMap") {
        return Err(invalid("only ConfigMaps (or a List of them) describe adapters".into()));
    }
    if object.metadata.labels.get(MANAGED_LABEL).is_some_and(|value| value != "true") {
        return Ok(());
    }
    let base = match object.data.get("baseModel").map(|base| base.trim()) {
        Some(base) if !base.is_empty() => base,
        _ => return Err(invalid("no data.baseModel".into())),
    };
    let adapters: Vec<String> = match object.data.get("adapters") {
        Some(list) if !list.trim().is_empty() => serde_saphyr::from_str(list).map_err(|error| {
            invalid(format!("data.adapters is not a YAML list of names: {error}"))
        })?,
        _ => Vec::new(),
    };
    for adapter in adapters.iter().map(|adapter| adapter.trim()).filter(|a| !a.is_empty()) {
        if let Some(first) = map.claim(adapter, base) {
            return Err(AdaptersFileError::Conflict {
                path: path.to_owned(),
                adapter: adapter.to_owned(),
                first: first.to_owned(),
                second: base.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: llama
  labels:
    inference.networking.k8s.io/bbr-managed: "true"
data:
  baseModel: meta-llama/Llama-3.1-8B
  adapters: |
    - sql-lora
    - chat-lora
"#;

    fn path() -> &'static Path {
        Path::new("adapters.yaml")
    }

    #[test]
    fn one_config_map() {
        let map = parse(path(), LLAMA).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map.base_of("sql-lora"), Some("meta-llama/Llama-3.1-8B"));
        assert_eq!(map.base_of("chat-lora"), Some("meta-llama/Llama-3.1-8B"));
        assert_eq!(map.base_of("meta-llama/Llama-3.1-8B"), None);
    }

    #[test]
    fn several_documents_and_lists() {
        let qwen = "kind: ConfigMap\nmetadata: {name: qwen}\ndata:\n  baseModel: qwen\n  adapters: \"- qwen-lora\"\n";
        let map = parse(path(), &format!("{LLAMA}---\n{qwen}---\n")).unwrap();
        assert_eq!((map.len(), map.base_of("qwen-lora")), (3, Some("qwen")));

        let list = "apiVersion: v1\nkind: List\nitems:\n- kind: ConfigMap\n  metadata: {name: a}\n  data: {baseModel: base-a, adapters: \"[x, y]\"}\n- kind: ConfigMap\n  metadata: {name: b}\n  data: {baseModel: base-b}\n";
        let map = parse(path(), list).unwrap();
        assert_eq!((map.len(), map.base_of("y")), (2, Some("base-a")));
        assert!(parse(path(), "").unwrap().is_empty(), "an empty file maps nothing");
    }

    #[test]
    fn an_adapter_claimed_twice_names_both_base_models() {
        let other = "kind: ConfigMap\nmetadata: {name: other}\ndata:\n  baseModel: mistral-7b\n  adapters: \"- sql-lora\"\n";
        let error = parse(path(), &format!("{LLAMA}---\n{other}")).unwrap_err().to_string();
        assert_eq!(
            error,
            "adapters file adapters.yaml: adapter 'sql-lora' is claimed by base models 'meta-llama/Llama-3.1-8B' and 'mistral-7b'"
        );
    }

    #[test]
    fn opted_out_config_maps_are_skipped_and_bad_objects_named() {
        let opted_out = LLAMA.replace("\"true\"", "\"false\"");
        assert!(parse(path(), &opted_out).unwrap().is_empty());
        let error = parse(path(), "kind: Secret\nmetadata: {name: s}\n").unwrap_err().to_string();
        assert!(error.contains("Secret 's'") && error.contains("only ConfigMaps"), "{error}");
        let error =
            parse(path(), "kind: ConfigMap\nmetadata: {name: c}\ndata: {adapters: \"- a\"}\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("ConfigMap 'c'") && error.contains("baseModel"), "{error}");
        let error = parse(path(), "kind: ConfigMap\ndata: {baseModel: b, adapters: \"a: 1\"}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a YAML list"), "{error}");
        let error = parse(path(), "kind: [").unwrap_err().to_string();
        assert!(error.starts_with("adapters file adapters.yaml is not YAML"), "{error}");
        let error = parse_bytes(path(), b"kind: ConfigMap\xff").unwrap_err().to_string();
        assert!(error.contains("not UTF-8"), "{error}");
    }
}
