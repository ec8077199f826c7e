//! The latest value of chosen series on a metrics page: what the multi-cluster extractor reads
//! from a peer cluster's EPP (its pool-average KV-cache utilization and queue size).
//!
//! Among the series a spec selects, the one with the latest timestamp wins; series without a
//! timestamp count as older than any with one, and among equals the first on the page wins
//! (a peer publishes one unlabelled series per gauge, so this only matters for odd pages).

use crate::mapping::MetricSpec;
use crate::text::{NameFilter, ParseError, Parser, Record};

/// The latest value of each of `specs` on `page`, in order; `None` where no series matches.
pub fn latest_values(page: &[u8], specs: &[&MetricSpec]) -> Result<Vec<Option<f64>>, ParseError> {
    let mut latest: Vec<Option<(f64, f64)>> = vec![None; specs.len()];
    let filter = NameFilter::exact(specs.iter().map(|spec| spec.name()));
    for record in Parser::from_bytes(page).with_filter(filter) {
        let Record::Sample(sample) = record? else { continue };
        let at = sample.timestamp.unwrap_or(f64::NEG_INFINITY);
        for (spec, slot) in specs.iter().zip(latest.iter_mut()) {
            if spec.matches(&sample) && slot.is_none_or(|(seen_at, _)| at > seen_at) {
                *slot = Some((at, sample.value));
            }
        }
    }
    Ok(latest.into_iter().map(|slot| slot.map(|(_, value)| value)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER_PAGE: &str = "\
# HELP llm_d_epp_average_kv_cache_utilization Average KV-cache utilization of the pool.
# TYPE llm_d_epp_average_kv_cache_utilization gauge
llm_d_epp_average_kv_cache_utilization{name=\"pool-a\"} 0.25
# TYPE llm_d_epp_average_queue_size gauge
llm_d_epp_average_queue_size{name=\"pool-a\"} 3 1000
llm_d_epp_average_queue_size{name=\"pool-b\"} 9 2000
llm_d_epp_average_queue_size{name=\"pool-c\"} 7
";

    #[test]
    fn the_latest_matching_series_wins() {
        let kv = MetricSpec::parse("llm_d_epp_average_kv_cache_utilization").unwrap();
        let queue = MetricSpec::parse("llm_d_epp_average_queue_size").unwrap();
        let pool_a = MetricSpec::parse("llm_d_epp_average_queue_size{name=\"pool-a\"}").unwrap();
        let missing = MetricSpec::parse("llm_d_epp_ready_endpoints").unwrap();
        let values =
            latest_values(PEER_PAGE.as_bytes(), &[&kv, &queue, &pool_a, &missing]).unwrap();
        assert_eq!(values, vec![Some(0.25), Some(9.0), Some(3.0), None]);
    }

    #[test]
    fn without_timestamps_the_first_series_wins() {
        let page = "q{a=\"1\"} 4\nq{a=\"2\"} 5\n";
        let queue = MetricSpec::parse("q").unwrap();
        assert_eq!(latest_values(page.as_bytes(), &[&queue]).unwrap(), vec![Some(4.0)]);
    }

    #[test]
    fn a_malformed_page_is_an_error() {
        let queue = MetricSpec::parse("q").unwrap();
        assert!(latest_values(b"q{a=\"1\" 4\n", &[&queue]).is_err());
    }
}
