//! Learning adapters from the model servers: every interval, `GET /v1/models` on each
//! endpoint; an entry whose `parent` is set is an adapter of that parent (vLLM lists each
//! loaded LoRA adapter so, next to its base model whose `parent` is null).
//!
//! Each endpoint's last good answer is kept until it answers again or leaves the endpoints
//! list, so a server that is briefly down does not send its adapters' requests to the wrong
//! pool. An endpoint that fails or answers garbage is skipped (logged at debug) and never
//! stops the others. What is stored is bounded: names longer than [`MAX_MODEL_NAME_BYTES`]
//! are ignored, answers larger than [`MAX_MODELS_RESPONSE_BYTES`] refused, and at most
//! [`MAX_LEARNED_ADAPTERS`] adapters kept (endpoints in address order, first claims first).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_model::fetch::{self, FetchError, PageRequest};
use serde::Deserialize;
use tokio::sync::watch;

use super::MAX_MODEL_NAME_BYTES;
use super::base_models::{AdapterMap, BaseModels};

/// Path polled on each endpoint.
pub const MODELS_PATH: &str = "/v1/models";
/// Largest `/v1/models` answer read.
pub const MAX_MODELS_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Most adapters learned across all endpoints.
pub const MAX_LEARNED_ADAPTERS: usize = 4096;
/// Longest wait for one endpoint's answer (shorter when the interval is).
const MAX_FETCH_TIME: Duration = Duration::from_secs(5);

/// Why one endpoint's models could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelsFetchError {
    /// The page could not be fetched (no connection, a failed exchange, an error status, an
    /// answer over [`MAX_MODELS_RESPONSE_BYTES`]).
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The answer is not an OpenAI model list.
    #[error("not a model list: {0}")]
    NotAModelList(#[from] serde_json::Error),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A `/v1/models` answer (OpenAI's list), the fields read.
#[derive(Deserialize)]
pub(crate) struct ModelList {
    pub(crate) data: Vec<ModelCard>,
}

/// One model of the list; an adapter names its base model in `parent`.
#[derive(Deserialize)]
pub(crate) struct ModelCard {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) parent: Option<String>,
}

/// The `(adapter, base model)` pairs of a `/v1/models` answer, names longer than
/// [`MAX_MODEL_NAME_BYTES`] left out.
pub fn adapters_in(answer: &[u8]) -> Result<Vec<(String, String)>, ModelsFetchError> {
    let list: ModelList = serde_json::from_slice(answer)?;
    let fits = |name: &str| !name.is_empty() && name.len() <= MAX_MODEL_NAME_BYTES;
    Ok(list
        .data
        .into_iter()
        .filter_map(|card| Some((card.id, card.parent?)))
        .filter(|(adapter, base)| fits(adapter) && fits(base) && adapter != base)
        .collect())
}

/// Polls every endpoint in `endpoints` each `interval` (and at once when the list changes),
/// publishing what is learned into `models`, until the task is dropped.
pub async fn poll(
    mut endpoints: watch::Receiver<Vec<SocketAddr>>,
    models: Arc<BaseModels>,
    interval: Duration,
) {
    let fetch_time = interval.min(MAX_FETCH_TIME);
    let mut last_good: HashMap<SocketAddr, Vec<(String, String)>> = HashMap::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = endpoints.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let mut addresses = endpoints.borrow_and_update().clone();
        addresses.sort_unstable();
        addresses.dedup();
        last_good.retain(|address, _| addresses.binary_search(address).is_ok());
        let mut round = tokio::task::JoinSet::new();
        for address in addresses.iter().copied() {
            round.spawn(async move { (address, fetch_adapters(address, fetch_time).await) });
        }
        while let Some(joined) = round.join_next().await {
            let Ok((address, fetched)) = joined else { continue };
            match fetched {
                Ok(adapters) => {
                    last_good.insert(address, adapters);
                }
                Err(error) => {
                    tracing::debug!(%address, %error, "models not read; keeping its last answer");
                }
            }
        }
        models.set_learned(merge(&addresses, &last_good));
    }
}

/// One map from every endpoint's adapters, endpoints in `addresses` order, first claim kept.
fn merge(
    addresses: &[SocketAddr],
    learned: &HashMap<SocketAddr, Vec<(String, String)>>,
) -> AdapterMap {
    let mut map = AdapterMap::default();
    for address in addresses {
        for (adapter, base) in learned.get(address).into_iter().flatten() {
            if map.len() >= MAX_LEARNED_ADAPTERS {
                tracing::debug!(limit = MAX_LEARNED_ADAPTERS, "learned adapters at the limit");
                return map;
            }
            if let Some(first) = map.claim(adapter, base) {
                tracing::debug!(%address, adapter, first, second = %base, "adapter reported with two bases; keeping the first");
            }
        }
    }
    map
}

async fn fetch_adapters(
    address: SocketAddr,
    limit: Duration,
) -> Result<Vec<(String, String)>, ModelsFetchError> {
    let answer = tokio::time::timeout(limit, fetch(address, MODELS_PATH))
        .await
        .map_err(|_| ModelsFetchError::Timeout(limit))??;
    adapters_in(&answer)
}

/// `GET path` (a model list) over a fresh plain-HTTP connection (one request per interval
/// per endpoint: not worth keeping connections open), at most [`MAX_MODELS_RESPONSE_BYTES`]
/// read.
pub(crate) async fn fetch(address: SocketAddr, path: &str) -> Result<Vec<u8>, ModelsFetchError> {
    let request = PageRequest {
        address,
        host: None,
        path,
        accept: "application/json",
        tls: None,
        limit: MAX_MODELS_RESPONSE_BYTES,
    };
    Ok(fetch::get(request).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"{"object":"list","data":[
        {"id":"meta-llama/Llama-3.1-8B","object":"model","root":"meta-llama/Llama-3.1-8B","parent":null,"max_model_len":8192},
        {"id":"sql-lora","object":"model","root":"/adapters/sql","parent":"meta-llama/Llama-3.1-8B"}]}"#;

    #[test]
    fn entries_with_a_parent_are_adapters() {
        let adapters = adapters_in(VLLM.as_bytes()).unwrap();
        assert_eq!(adapters, vec![("sql-lora".to_owned(), "meta-llama/Llama-3.1-8B".to_owned())]);
        assert!(adapters_in(br#"{"data":[{"id":"m"}]}"#).unwrap().is_empty(), "no parent field");
    }

    #[test]
    fn garbage_and_oversized_names_are_refused_or_left_out() {
        assert!(matches!(adapters_in(b"<html>"), Err(ModelsFetchError::NotAModelList(_))));
        assert!(adapters_in(br#"{"data":"nope"}"#).is_err());
        let long = "a".repeat(MAX_MODEL_NAME_BYTES + 1);
        let answer =
            format!(r#"{{"data":[{{"id":"{long}","parent":"b"}},{{"id":"x","parent":"b"}}]}}"#);
        assert_eq!(adapters_in(answer.as_bytes()).unwrap(), vec![("x".into(), "b".into())]);
    }

    #[test]
    fn merging_keeps_the_first_claim_and_the_bound() {
        let first: SocketAddr = "10.0.0.1:8000".parse().unwrap();
        let second: SocketAddr = "10.0.0.2:8000".parse().unwrap();
        let learned = HashMap::from([
            (first, vec![("a".to_owned(), "base-1".to_owned())]),
            (second, vec![("a".to_owned(), "base-2".to_owned()), ("b".into(), "base-2".into())]),
        ]);
        let map = merge(&[first, second], &learned);
        assert_eq!((map.base_of("a"), map.base_of("b")), (Some("base-1"), Some("base-2")));

        let many: Vec<(String, String)> =
            (0..MAX_LEARNED_ADAPTERS + 10).map(|i| (format!("a{i}"), "base".to_owned())).collect();
        let map = merge(&[first], &HashMap::from([(first, many)]));
        assert_eq!(map.len(), MAX_LEARNED_ADAPTERS);
    }
}
