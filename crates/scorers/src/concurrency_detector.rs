//! `concurrency-detector` reading the `inflight-load-producer`, as in llm-d-router.
//!
//! The detector itself (formula, modes, filter) is the core's [`ConcurrencyDetector`]. The
//! core alone has no in-flight producer and lets the plugin count for itself; the built-in
//! registry replaces that registration with this one, which reads the counts of the producer
//! named `inFlightLoadProducerName` ([`crate::inflight_load`]), creating an
//! `inflight-load-producer` with default parameters when the name is left at its default and
//! the config declares none.
//! The counts it reads are then the ones every other reader of the producer sees, including
//! other replicas' through a cross-replica syncer.

use std::sync::Arc;

use scheduler_core::flow::{ConcurrencyDetector, ConcurrencyParameters, InFlight, InFlightSource};
use scheduler_core::{
    BindPlugins, ConstructedPlugins, EndpointId, Plugin, PluginError, PluginSpec,
};

use crate::inflight_load::{self, InFlightLoad};

impl InFlightSource for InFlightLoad {
    fn in_flight(&self, endpoint: EndpointId) -> InFlight {
        InFlight { requests: self.requests(endpoint), tokens: self.tokens(endpoint) }
    }
}

/// Binds a detector to its producer once every plugin of the config exists.
struct ProducerBinding {
    detector: Arc<ConcurrencyDetector>,
    producer_name: String,
}

impl BindPlugins for ProducerBinding {
    fn bind(&self, plugins: &ConstructedPlugins) -> Result<(), PluginError> {
        let producer = inflight_load::named(plugins, &self.producer_name)?;
        self.detector.bind_source(producer);
        Ok(())
    }
}

/// Constructs a `concurrency-detector`: saturation detector and filter, reading a producer.
pub fn construct(spec: &PluginSpec<'_>) -> Result<Plugin, PluginError> {
    let parameters: ConcurrencyParameters = spec.parameters()?;
    let producer_name = parameters.producer_name().to_owned();
    let detector =
        Arc::new(ConcurrencyDetector::new(parameters).map_err(PluginError::InvalidParameters)?);
    let default_producers = if producer_name == inflight_load::TYPE_NAME {
        vec![inflight_load::TYPE_NAME]
    } else {
        Vec::new()
    };
    Ok(Plugin {
        saturation_detector: Some(detector.clone()),
        filter: Some(detector.clone()),
        binder: Some(Arc::new(ProducerBinding { detector, producer_name })),
        default_producers,
        ..Plugin::default()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use scheduler_core::flow::configured_detector;
    use scheduler_core::{
        Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    };

    use crate::builtin_registry;

    fn pool() -> Arc<PoolSnapshot> {
        Arc::new(PoolSnapshot::new([
            EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())),
            EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into())),
        ]))
    }

    use super::*;

    #[test]
    fn reads_the_default_producer_created_for_it() {
        let config = EndpointPickerConfig::from_yaml(
            "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 1}\n- type: max-score-picker\nsaturationDetector: {pluginRef: concurrency-detector}\n",
        )
        .expect("config");
        let registry = builtin_registry();
        let plugins = config.construct_plugins(&registry).expect("plugins");
        let producer = inflight_load::named(&plugins, inflight_load::TYPE_NAME)
            .expect("a default producer is created");
        let scheduler = config.build_with(&plugins, &registry).expect("scheduler");
        let detector = configured_detector(&config, &plugins).expect("a detector");
        let pool = pool();
        let now = Instant::now();
        let mut first = scheduler.schedule(&InferenceRequest::new("m", "a"), &pool).expect("pick");
        let picked = first.primary().id();
        assert_eq!(producer.requests(picked), 1, "the producer's hook counted it");
        assert_eq!(detector.saturation(&pool, now), 0.5);
        // The detector is the profile's filter too: the busy endpoint is at its limit of 1.
        let second = scheduler.schedule(&InferenceRequest::new("m", "b"), &pool).expect("pick");
        assert_ne!(second.primary().id(), picked);
        assert!(detector.is_saturated(&pool, now));
        drop(first.take_completion());
        assert!(!detector.is_saturated(&pool, now), "the producer released the first request");
    }

    #[test]
    fn a_named_producer_is_read_and_a_missing_one_refused() {
        let yaml = "plugins:\n- {type: inflight-load-producer, name: load}\n- type: concurrency-detector\n  parameters: {inFlightLoadProducerName: load, concurrencyMode: tokens}\n";
        let config = EndpointPickerConfig::from_yaml(yaml).expect("config");
        let plugins = config.construct_plugins(&builtin_registry()).expect("plugins");
        assert!(plugins.get(inflight_load::TYPE_NAME).is_none(), "no default when one is named");
        let missing = yaml.replace("inFlightLoadProducerName: load", "inFlightLoadProducerName: x");
        let error = EndpointPickerConfig::from_yaml(&missing)
            .expect("config")
            .construct_plugins(&builtin_registry())
            .expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("inFlightLoadProducerName: no inflight-load-producer named 'x'"),
            "{error}"
        );
        let bad = "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 0, headroom: -1}\n";
        let error = EndpointPickerConfig::from_yaml(bad)
            .expect("config")
            .construct_plugins(&builtin_registry())
            .expect_err("refused");
        assert!(
            error.to_string().ends_with(
                "invalid parameters: maxConcurrency must be strictly positive, got 0; headroom must be a non-negative value, got -1"
            ),
            "{error}"
        );
    }
}
