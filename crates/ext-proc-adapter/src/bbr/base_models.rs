//! Which base model a requested model belongs to: an adapter's base from the adapters file,
//! else from what the model servers report, else the model itself.
//!
//! Both maps are replaced whole (a reload, a poll round), never edited in place: a lookup
//! reads one consistent map of each kind.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// Adapter name to base model name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterMap {
    bases: HashMap<String, String>,
}

impl AdapterMap {
    /// The base model of `adapter`, if it is a known adapter.
    pub fn base_of(&self, adapter: &str) -> Option<&str> {
        self.bases.get(adapter).map(String::as_str)
    }

    /// How many adapters are known.
    pub fn len(&self) -> usize {
        self.bases.len()
    }

    /// Whether no adapter is known.
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty()
    }

    /// Records `adapter` as an adapter of `base`; the base it already had, if different, is
    /// returned and kept.
    pub(crate) fn claim(&mut self, adapter: &str, base: &str) -> Option<&str> {
        if !self.bases.contains_key(adapter) {
            self.bases.insert(adapter.to_owned(), base.to_owned());
            return None;
        }
        self.bases.get(adapter).map(String::as_str).filter(|existing| *existing != base)
    }
}

impl<A: Into<String>, B: Into<String>> FromIterator<(A, B)> for AdapterMap {
    /// The first pair of each adapter wins.
    fn from_iter<I: IntoIterator<Item = (A, B)>>(pairs: I) -> Self {
        let mut map = Self::default();
        for (adapter, base) in pairs {
            map.bases.entry(adapter.into()).or_insert_with(|| base.into());
        }
        map
    }
}

/// The adapter maps the router looks models up in, shared by the request streams, the
/// adapters-file watcher and the models poller.
#[derive(Debug, Default)]
pub struct BaseModels {
    configured: RwLock<Arc<AdapterMap>>,
    learned: RwLock<Arc<AdapterMap>>,
}

impl BaseModels {
    /// Maps with `configured` from the adapters file and nothing learned yet.
    pub fn new(configured: AdapterMap) -> Self {
        Self { configured: RwLock::new(Arc::new(configured)), learned: RwLock::default() }
    }

    /// Replaces the adapters file's map.
    pub fn set_configured(&self, map: AdapterMap) {
        *self.configured.write() = Arc::new(map);
    }

    /// Replaces the map learned from the model servers.
    pub fn set_learned(&self, map: AdapterMap) {
        *self.learned.write() = Arc::new(map);
    }

    /// The map learned from the model servers.
    pub fn learned(&self) -> Arc<AdapterMap> {
        Arc::clone(&self.learned.read())
    }

    /// The base model of `model`: its base in the adapters file, else its learned base, else
    /// `model` itself (a base model, or a model nobody described).
    pub fn base_of(&self, model: &str) -> String {
        if let Some(base) = self.configured.read().base_of(model) {
            return base.to_owned();
        }
        if let Some(base) = self.learned.read().base_of(model) {
            return base.to_owned();
        }
        model.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_wins_then_learned_then_the_model_itself() {
        let models = BaseModels::new([("sql-lora", "llama-8b")].into_iter().collect());
        models
            .set_learned([("sql-lora", "other-base"), ("chat-lora", "qwen")].into_iter().collect());
        assert_eq!(models.base_of("sql-lora"), "llama-8b");
        assert_eq!(models.base_of("chat-lora"), "qwen");
        assert_eq!(models.base_of("llama-8b"), "llama-8b");
        assert_eq!(models.base_of("unknown"), "unknown");
        models.set_configured(AdapterMap::default());
        assert_eq!(models.base_of("sql-lora"), "other-base", "learned once the file drops it");
    }

    #[test]
    fn a_claim_keeps_the_first_base_and_reports_the_conflict() {
        let mut map = AdapterMap::default();
        assert_eq!(map.claim("a", "base-1"), None);
        assert_eq!(map.claim("a", "base-1"), None, "the same claim twice is no conflict");
        assert_eq!(map.claim("a", "base-2"), Some("base-1"));
        assert_eq!(map.base_of("a"), Some("base-1"));
        assert_eq!(map.len(), 1);
    }
}
