//! Named scalar attributes of endpoints published by a data-layer producer (llm-d's
//! endpoint attributes, such as `dcgm-extractor`'s `GPUUtilization`), read by the plugins
//! that name the producer (`endpoint-attribute-filter`, `endpoint-attribute-scorer`).
//!
//! The producer publishes a whole attribute at a time, once per scrape round; decisions read a
//! lock-free snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::pool::endpoint::EndpointId;

/// One attribute's values, by endpoint.
pub type AttributeValues = HashMap<EndpointId, f64>;

/// The attributes one producer publishes.
#[derive(Debug, Default)]
pub struct EndpointAttributes {
    by_name: ArcSwap<HashMap<Box<str>, Arc<AttributeValues>>>,
}

impl EndpointAttributes {
    /// Replaces every value of `attribute` with `values` (an endpoint absent from them no
    /// longer has the attribute).
    pub fn publish(&self, attribute: &str, values: AttributeValues) {
        let values = Arc::new(values);
        self.by_name.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(attribute.into(), Arc::clone(&values));
            next
        });
    }

    /// The values of `attribute` at the last publication, if it was ever published.
    pub fn values(&self, attribute: &str) -> Option<Arc<AttributeValues>> {
        self.by_name.load().get(attribute).cloned()
    }

    /// Endpoint `endpoint`'s value of `attribute`.
    pub fn value(&self, attribute: &str, endpoint: EndpointId) -> Option<f64> {
        self.by_name.load().get(attribute)?.get(&endpoint).copied()
    }
}

/// A producer's attributes as a data-layer plugin holds them: compared by identity, since two
/// producers with equal values are still two producers.
#[derive(Clone, Debug, Default)]
pub struct AttributeHandle(pub Arc<EndpointAttributes>);

impl PartialEq for AttributeHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for AttributeHandle {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::endpoint::Endpoint;

    #[test]
    fn a_publication_replaces_the_attribute_whole() {
        let attributes = EndpointAttributes::default();
        let first = Endpoint::new(([10, 0, 0, 1], 8000).into()).id;
        let second = Endpoint::new(([10, 0, 0, 2], 8000).into()).id;
        assert_eq!(attributes.value("GPUUtilization", first), None);
        attributes.publish("GPUUtilization", HashMap::from([(first, 0.5), (second, 0.25)]));
        attributes.publish("Other", HashMap::from([(first, 7.0)]));
        assert_eq!(attributes.value("GPUUtilization", second), Some(0.25));
        attributes.publish("GPUUtilization", HashMap::from([(first, 0.75)]));
        assert_eq!(attributes.value("GPUUtilization", first), Some(0.75));
        assert_eq!(attributes.value("GPUUtilization", second), None);
        assert_eq!(attributes.value("Other", first), Some(7.0));
    }
}
