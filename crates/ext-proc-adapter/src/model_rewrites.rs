//! The model rewrites file of `epp` (`--model-rewrites-file`): loaded at start, reloaded when
//! its content changes, and published to the director, which routes every later request by
//! the new rules (requests in flight keep the rules they started with).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use scheduler_core::Director;
use scheduler_core::rewrite::{ModelRewrites, RewriteError};

use crate::metrics::EppMetrics;

/// Where the rewrites come from and how they draw.
#[derive(Clone, Debug)]
pub struct ModelRewriteSettings {
    /// The file of `InferenceModelRewrite` (and legacy `InferenceModel`) objects.
    pub path: PathBuf,
    /// Header whose value pins the draw (see [`ModelRewrites::with_sticky_header`]).
    pub sticky_header: Option<String>,
    /// Refuse models no rule names (see [`ModelRewrites::strict`]).
    pub strict: bool,
    /// Seed of the weighted draw.
    pub seed: u64,
}

/// Why the rewrites file is unusable at start.
#[derive(Debug, thiserror::Error)]
pub enum ModelRewritesFileError {
    /// The file cannot be read.
    #[error("cannot read model rewrites file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Its content is refused.
    #[error("invalid model rewrites file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: RewriteError,
    },
}

impl ModelRewriteSettings {
    /// The rewrites `content` describes, with these settings.
    pub fn parse(
        &self,
        path: &Path,
        content: &[u8],
    ) -> Result<ModelRewrites, ModelRewritesFileError> {
        let invalid = |source| ModelRewritesFileError::Invalid { path: path.to_owned(), source };
        let text = std::str::from_utf8(content)
            .map_err(|error| invalid(RewriteError::Syntax(format!("not UTF-8: {error}"))))?;
        let mut rewrites = ModelRewrites::from_yaml(text)
            .map_err(invalid)?
            .with_seed(self.seed)
            .strict(self.strict);
        if let Some(header) = &self.sticky_header {
            rewrites = rewrites.with_sticky_header(header);
        }
        Ok(rewrites)
    }

    /// Reads and applies the file; returns its content (what the watcher compares against).
    pub async fn load_into(
        &self,
        director: &Director,
        metrics: &EppMetrics,
    ) -> Result<Vec<u8>, ModelRewritesFileError> {
        let content = tokio::fs::read(&self.path)
            .await
            .map_err(|source| ModelRewritesFileError::Read { path: self.path.clone(), source })?;
        let rules = publish(director, metrics, self.parse(&self.path, &content)?);
        tracing::info!(path = %self.path.display(), rules, "model rewrites loaded");
        Ok(content)
    }

    /// Reloads the file whenever its content changes; a refused edit keeps the last good rules.
    pub async fn watch(self, director: Arc<Director>, metrics: Arc<EppMetrics>, applied: Vec<u8>) {
        let path = self.path.clone();
        crate::file_watch::watch(path, "model rewrites file", applied, move |path, content| {
            self.parse(path, content).map(|rewrites| publish(&director, &metrics, rewrites))
        })
        .await;
    }
}

/// Gives the configured names their own metric series and swaps the rules in; returns how
/// many rules there are.
pub(crate) fn publish(director: &Director, metrics: &EppMetrics, rewrites: ModelRewrites) -> usize {
    metrics.admit_model_names(rewrites.model_names());
    let rules = rewrites.len();
    director.set_model_rewrites(Some(Arc::new(rewrites)));
    rules
}
