//! The models each endpoint serves, polled from its OpenAI model list (`models-data-source`
//! with `models-data-extractor`): every interval, `GET path` on every endpoint of the pool,
//! over HTTP or, with the source's `scheme: https`, over TLS with the source's settings (as
//! the metrics source scrapes).
//!
//! An endpoint's last good answer is kept until it answers again or leaves the pool, so a
//! briefly unreachable server does not lose its models. What is stored is bounded: answers
//! over [`MAX_MODELS_RESPONSE_BYTES`] are refused, names over [`MAX_MODEL_NAME_BYTES`] left
//! out, and at most [`MAX_MODELS_PER_ENDPOINT`] models kept per endpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics_model::fetch::{self, PageRequest};
use parking_lot::RwLock;
use scheduler_core::{EndpointId, SharedPool};

use crate::bbr::MAX_MODEL_NAME_BYTES;
use crate::bbr::models_poller::ModelList;
pub use crate::bbr::models_poller::{MAX_MODELS_RESPONSE_BYTES, ModelsFetchError};
use crate::endpoint_poll::{MAX_FETCH_TIME, poll_round, ticks};

/// Most models kept per endpoint.
pub const MAX_MODELS_PER_ENDPOINT: usize = 1024;

/// A model an endpoint serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedModel {
    /// The model's name (`id`).
    pub id: String,
    /// The base model when this is an adapter (`parent`).
    pub parent: Option<String>,
}

/// How the model lists are polled.
#[derive(Clone, Debug)]
pub struct ModelsPollSettings {
    /// Path of the model list.
    pub path: String,
    /// Time between two polls of the pool.
    pub interval: Duration,
    /// TLS client configuration; `None` polls over plain HTTP.
    pub tls: Option<metrics_model::ScrapeTls>,
}

/// The models of every endpoint, from the last good answer of each.
#[derive(Debug, Default)]
pub struct EndpointModels {
    by_endpoint: RwLock<HashMap<EndpointId, Arc<[ServedModel]>>>,
}

impl EndpointModels {
    /// The models endpoint `id` served at its last good answer.
    pub fn get(&self, id: EndpointId) -> Option<Arc<[ServedModel]>> {
        self.by_endpoint.read().get(&id).cloned()
    }

    /// Whether endpoint `id` serves `model` (a base model or an adapter).
    pub fn serves(&self, id: EndpointId, model: &str) -> bool {
        self.get(id).is_some_and(|models| models.iter().any(|served| served.id == model))
    }
}

/// The models of a model-list answer, within the bounds.
pub fn models_in(answer: &[u8]) -> Result<Vec<ServedModel>, ModelsFetchError> {
    let list: ModelList = serde_json::from_slice(answer)?;
    let fits = |name: &str| !name.is_empty() && name.len() <= MAX_MODEL_NAME_BYTES;
    Ok(list
        .data
        .into_iter()
        .filter(|card| fits(&card.id) && card.parent.as_deref().is_none_or(fits))
        .take(MAX_MODELS_PER_ENDPOINT)
        .map(|card| ServedModel { id: card.id, parent: card.parent })
        .collect())
}

/// One endpoint's model list.
async fn fetch_models(
    address: std::net::SocketAddr,
    settings: &ModelsPollSettings,
    limit: Duration,
) -> Result<Vec<ServedModel>, String> {
    let request = PageRequest {
        address,
        host: None,
        path: &settings.path,
        accept: "application/json",
        tls: settings.tls.as_ref(),
        limit: MAX_MODELS_RESPONSE_BYTES,
    };
    let answer = tokio::time::timeout(limit, fetch::get(request))
        .await
        .map_err(|_| ModelsFetchError::Timeout(limit).to_string())?
        .map_err(|error| error.to_string())?;
    models_in(&answer).map_err(|error| error.to_string())
}

/// Polls every endpoint of `pool` each interval into `models`, until the task is dropped.
pub async fn poll(
    pool: Arc<SharedPool>,
    models: Arc<EndpointModels>,
    settings: ModelsPollSettings,
) {
    let mut ticks = ticks(settings.interval);
    let fetch_time = MAX_FETCH_TIME;
    let settings = Arc::new(settings);
    loop {
        ticks.tick().await;
        let (endpoints, answered) = poll_round(&pool, "model list", |(_, address, _)| {
            let settings = Arc::clone(&settings);
            async move {
                let list = fetch_models(address, &settings, fetch_time).await?;
                Ok(Arc::<[ServedModel]>::from(list))
            }
        })
        .await;
        let mut stored = models.by_endpoint.write();
        stored.retain(|id, _| endpoints.iter().any(|(present, _, _)| present == id));
        stored.extend(answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_and_adapters_are_kept_within_bounds() {
        let answer = br#"{"object":"list","data":[
            {"id":"base","object":"model","parent":null},
            {"id":"sql-lora","parent":"base"}]}"#;
        assert_eq!(
            models_in(answer).unwrap(),
            [
                ServedModel { id: "base".into(), parent: None },
                ServedModel { id: "sql-lora".into(), parent: Some("base".into()) }
            ]
        );
        assert!(models_in(b"<html>").is_err());
        let many: Vec<String> =
            (0..MAX_MODELS_PER_ENDPOINT + 5).map(|i| format!(r#"{{"id":"m{i}"}}"#)).collect();
        let answer = format!(r#"{{"data":[{}]}}"#, many.join(","));
        assert_eq!(models_in(answer.as_bytes()).unwrap().len(), MAX_MODELS_PER_ENDPOINT);
        let long = "a".repeat(MAX_MODEL_NAME_BYTES + 1);
        let answer = format!(r#"{{"data":[{{"id":"{long}"}},{{"id":"ok"}}]}}"#);
        assert_eq!(models_in(answer.as_bytes()).unwrap().len(), 1);
    }
}
