//! Metrics of the precise prefix index for `epp`: each `precise-prefix-cache-producer` (or
//! deprecated `precise-prefix-cache-scorer`) the config declares adds its index's and
//! subscriptions' series (`llm_d_epp_kv_cache_*`, labelled with the plugin's name) to the
//! metrics page. Without the `kv-events` cargo feature no such plugin can be constructed, so
//! there is nothing to add.

use scheduler_core::ConstructedPlugins;

use crate::metrics::EppMetrics;

/// Adds the series of every precise producer among `plugins` to `metrics`' page; returns how
/// many producers were found.
pub fn attach_metrics(plugins: &ConstructedPlugins, metrics: &EppMetrics) -> usize {
    #[cfg(feature = "kv-events")]
    {
        let producers = scorers::precise_prefix::precise_producers(plugins);
        let found = producers.len();
        for (name, producer) in producers {
            metrics.add_section(move |out: &mut String| producer.render_metrics(&name, out));
        }
        found
    }
    #[cfg(not(feature = "kv-events"))]
    {
        let _ = (plugins, metrics);
        0
    }
}

#[cfg(all(test, feature = "kv-events"))]
mod tests {
    use kv_events::{BlockStored, Encoding, Event, EventBatch, encode_batch};
    use metrics_model::text::Parser;
    use scheduler_core::{Endpoint, EndpointPickerConfig, EndpointState, PoolSnapshot};

    use super::*;

    const CONFIG: &str = "
plugins:
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 4}
    kvEventsConfig: {zmqEndpoint: 'tcp://127.0.0.1:0', discoverPods: false}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise}
- type: max-score-picker
";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_page_carries_the_precise_index_series() {
        let registry = scorers::builtin_registry();
        let config = EndpointPickerConfig::from_yaml(CONFIG).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let metrics = EppMetrics::new("pool", None);
        assert_eq!(attach_metrics(&plugins, &metrics), 1);

        let (_, producer) = scorers::precise_prefix::precise_producers(&plugins).remove(0);
        let endpoint = EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into()));
        let id = endpoint.id();
        scheduler_core::PoolObserver::membership_changed(
            producer.as_ref(),
            &PoolSnapshot::new([endpoint]),
        );
        let batch = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: vec![1, 2],
                token_ids: (0..8).collect(),
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        };
        let payload = encode_batch(&batch, Encoding::ArrayTagged);
        producer.index().ingest(id, 0, "m", &payload).unwrap();
        producer.index().ingest(id, 4, "m", &payload).unwrap();

        let text = metrics.encode();
        let value = |name: &str, label: Option<(&str, &str)>| {
            Parser::new(&text)
                .samples()
                .map(|sample| sample.unwrap_or_else(|error| panic!("{error} in\n{text}")))
                .find(|sample| {
                    sample.name == name
                        && sample.labels.iter().any(|l| l.name == "plugin" && l.value == "precise")
                        && label.is_none_or(|(k, v)| {
                            sample.labels.iter().any(|l| l.name == k && l.value == v)
                        })
                })
                .map(|sample| sample.value)
        };
        assert_eq!(value("llm_d_epp_kv_cache_events_batches_total", None), Some(2.0), "{text}");
        assert_eq!(value("llm_d_epp_kv_cache_index_admissions_total", None), Some(4.0));
        assert_eq!(value("llm_d_epp_kv_cache_events_sequence_gaps_total", None), Some(1.0));
        assert_eq!(value("llm_d_epp_kv_cache_index_blocks", None), Some(2.0));
        assert_eq!(
            value("llm_d_epp_kv_cache_index_endpoints", Some(("state", "untrusted"))),
            Some(1.0)
        );
        // The series go before the end-of-exposition marker, which stays last and single.
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
