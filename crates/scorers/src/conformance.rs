//! The plugins of llm-d-router's conformance tests.
//!
//! `destination-endpoint-served-verifier` echoes, on the response, the endpoint the proxy says
//! served the request. It matches llm-d-router's `requestcontrol/test/responsereceived`: once the response's headers
//! come, header `x-conformance-test-served-endpoint` is set to the proxy's
//! `x-gateway-destination-endpoint-served` (from its `envoy.lb` metadata) as written, or to
//! `fail: missing envoy lb metadata` / `fail: missing destination endpoint served metadata`
//! when the proxy reported none. Only the ext-proc server hears from a proxy; elsewhere the
//! plugin writes nothing. It takes no parameters.
//!
//! `header-based-testing-filter` is the other half of those tests: it keeps the endpoints named
//! in the `test-epp-endpoint-selection` request header, so a test chooses where its request
//! goes. It matches llm-d-router's `scheduling/test/filter`:
//! - the header is a comma-separated list; each item is an IP (IPv6 with or without brackets),
//!   matching an endpoint at that address on any port, or `IP:port` (`[IPv6]:port`), matching
//!   only that port; blanks are skipped, unparsable items match nothing;
//! - an IP-only item names the last candidate at that address, and once an address is chosen
//!   no other endpoint at that address is (the first item naming it wins);
//! - a missing or blank header, or one naming no candidate, leaves no endpoint.
//!
//! Go's filter returns the chosen endpoints in header order; this one keeps them in candidate
//! order, as every filter here does. The order cannot be observed in Go either: its
//! `max-score-picker` and `random-picker` shuffle the candidates before choosing, so the
//! conformance tests can only rely on which endpoints are eligible, which is the same set.
//! Go parses no parameters; here any parameter is refused, as a typo should be.

use std::net::{IpAddr, SocketAddr};

use scheduler_core::{
    CycleState, Filter, InferenceRequest, PoolSnapshot, ResponseHeaders, SchedulingResult,
    ServedReport,
};

/// llm-d type name of the endpoint-selection filter.
pub const HEADER_FILTER_TYPE_NAME: &str = "header-based-testing-filter";
/// The request header naming the endpoints a test allows.
pub const ENDPOINT_SELECTION_HEADER: &str = "test-epp-endpoint-selection";

/// llm-d type name of the served-endpoint verifier.
pub const SERVED_VERIFIER_TYPE_NAME: &str = "destination-endpoint-served-verifier";
/// The response header the verifier writes.
pub const RESULT_HEADER: &str = "x-conformance-test-served-endpoint";

/// Writes the served endpoint the proxy reported on the response.
#[derive(Clone, Copy, Debug, Default)]
pub struct DestinationEndpointServedVerifier;

impl ResponseHeaders for DestinationEndpointServedVerifier {
    fn response_headers(&self, _result: &SchedulingResult, _headers: &mut Vec<(String, String)>) {}

    fn served_headers(&self, served: ServedReport<'_>, headers: &mut Vec<(String, String)>) {
        let value = match served {
            ServedReport::NoLbMetadata => "fail: missing envoy lb metadata",
            ServedReport::NoServedEndpoint => "fail: missing destination endpoint served metadata",
            ServedReport::Served(endpoint) => endpoint,
        };
        if !headers.iter().any(|(name, _)| name == RESULT_HEADER) {
            headers.push((RESULT_HEADER.to_owned(), value.to_owned()));
        }
    }
}

/// Keeps the endpoints the `test-epp-endpoint-selection` header names.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderBasedTestingFilter;

/// One item of the header.
enum Selection {
    Address(IpAddr),
    Exact(SocketAddr),
}

fn parse_item(item: &str) -> Option<Selection> {
    if let Ok(exact) = item.parse::<SocketAddr>() {
        return Some(Selection::Exact(exact));
    }
    let bare = item.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(Selection::Address)
}

impl HeaderBasedTestingFilter {
    /// The candidates (positions in `pool`) that `header` selects, in header order.
    pub fn selected(header: &str, pool: &PoolSnapshot, candidates: &[u32]) -> Vec<u32> {
        let address = |index: u32| pool.get(index).map(|state| state.endpoint.address);
        let mut chosen: Vec<u32> = Vec::new();
        for item in header.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let found = match parse_item(item) {
                Some(Selection::Exact(wanted)) => {
                    candidates.iter().copied().find(|&index| address(index) == Some(wanted))
                }
                Some(Selection::Address(wanted)) => candidates
                    .iter()
                    .copied()
                    .rev()
                    .find(|&index| address(index).is_some_and(|at| at.ip() == wanted)),
                None => None,
            };
            let Some(found) = found else { continue };
            let ip = address(found).map(|at| at.ip());
            if !chosen.iter().any(|&index| address(index).map(|at| at.ip()) == ip) {
                chosen.push(found);
            }
        }
        chosen
    }
}

impl Filter for HeaderBasedTestingFilter {
    fn filter(
        &self,
        _state: &mut CycleState,
        request: &InferenceRequest,
        pool: &PoolSnapshot,
        candidates: &mut Vec<u32>,
    ) {
        let header = request.header(ENDPOINT_SELECTION_HEADER).unwrap_or_default();
        let chosen = Self::selected(header, pool, candidates);
        candidates.retain(|index| chosen.contains(index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Instant;

    use scheduler_core::{Endpoint, EndpointPickerConfig, EndpointState};

    fn pool(addresses: &[&str]) -> PoolSnapshot {
        PoolSnapshot::new(
            addresses.iter().map(|address| {
                EndpointState::new(Endpoint::new(address.parse().expect("an address")))
            }),
        )
    }

    /// The addresses the filter keeps for `header`, in the order kept.
    fn kept(addresses: &[&str], header: Option<&str>) -> Vec<String> {
        let pool = pool(addresses);
        let mut request = InferenceRequest::new("m", "p");
        if let Some(header) = header {
            request = request.with_header(ENDPOINT_SELECTION_HEADER, header);
        }
        let mut candidates: Vec<u32> = (0..addresses.len() as u32).collect();
        let mut state = CycleState::new(Instant::now(), 1);
        HeaderBasedTestingFilter.filter(&mut state, &request, &pool, &mut candidates);
        candidates
            .iter()
            .map(|&index| pool.get(index).unwrap().endpoint.address.to_string())
            .collect()
    }

    #[test]
    fn the_header_names_the_endpoints_kept() {
        let one = ["10.0.0.1:3000"];
        assert!(kept(&one, None).is_empty(), "no header, no endpoint");
        assert!(kept(&one, Some("  ")).is_empty());
        assert!(kept(&one, Some("10.0.0.99")).is_empty());
        assert_eq!(kept(&["10.0.0.1:3002"], Some("10.0.0.1")), ["10.0.0.1:3002"], "any port");
        let three = ["10.0.0.1:3000", "10.0.0.1:3002", "10.0.0.2:3002"];
        assert_eq!(kept(&three, Some("10.0.0.1:3002")), ["10.0.0.1:3002"], "that port only");
        assert!(kept(&["10.0.0.1:3002"], Some("10.0.0.1:9999")).is_empty());
        assert!(kept(&one, Some("10.0.0.1:http, not-an-ip")).is_empty());
        let v6 = ["[fd00::1]:3002", "[fd00::2]:3004"];
        assert_eq!(kept(&v6, Some("[fd00::1]:3002")), ["[fd00::1]:3002"]);
        assert_eq!(kept(&v6, Some("fd00::2")), ["[fd00::2]:3004"]);
        assert_eq!(kept(&v6, Some("[fd00::2]")), ["[fd00::2]:3004"]);
    }

    #[test]
    fn one_endpoint_per_address_and_candidate_order() {
        let three = ["10.0.0.1:3000", "10.0.0.2:3002", "10.0.0.3:3004"];
        // Go returns 3 then 2 (header order); the set is the same, kept in candidate order.
        assert_eq!(
            kept(&three, Some("10.0.0.3:3004, 10.0.0.2, 10.0.0.3")),
            ["10.0.0.2:3002", "10.0.0.3:3004"]
        );
        let pool = pool(&three);
        assert_eq!(
            HeaderBasedTestingFilter::selected(
                "10.0.0.3:3004, 10.0.0.2, 10.0.0.3",
                &pool,
                &[0, 1, 2]
            ),
            [2, 1],
            "the selection itself follows the header"
        );
        // Two ports on one address: an IP-only item names the last one, and the first item to
        // reach an address holds it.
        let shared = ["10.0.0.1:3000", "10.0.0.1:3002"];
        assert_eq!(kept(&shared, Some("10.0.0.1")), ["10.0.0.1:3002"]);
        assert_eq!(kept(&shared, Some("10.0.0.1:3000, 10.0.0.1:3002")), ["10.0.0.1:3000"]);
    }

    #[test]
    fn a_conformance_style_config_routes_to_the_named_endpoint() {
        let config = EndpointPickerConfig::from_yaml(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: header-based-testing-filter\n- type: max-score-picker\nschedulingProfiles:\n- name: conformance-profile\n  plugins:\n  - pluginRef: header-based-testing-filter\n  - pluginRef: max-score-picker\n",
        )
        .expect("config");
        let scheduler = config.build(&crate::builtin_registry()).expect("scheduler");
        let pool = std::sync::Arc::new(pool(&["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]));
        for _ in 0..20 {
            let request =
                InferenceRequest::new("m", "p").with_header(ENDPOINT_SELECTION_HEADER, "10.0.0.2");
            let result = scheduler.schedule(&request, &pool).expect("a pick");
            assert_eq!(result.primary().endpoint.address.to_string(), "10.0.0.2:8000");
        }
        assert!(scheduler.schedule(&InferenceRequest::new("m", "p"), &pool).is_err());
        let parameters =
            "plugins:\n- type: header-based-testing-filter\n  parameters: {header: x}\n";
        let error = EndpointPickerConfig::from_yaml(parameters)
            .expect("config")
            .build(&crate::builtin_registry())
            .expect_err("refused");
        assert!(error.to_string().contains("unknown field `header`"), "{error}");
    }

    #[test]
    fn the_report_becomes_the_header() {
        let written = |served| {
            let mut headers = Vec::new();
            DestinationEndpointServedVerifier.served_headers(served, &mut headers);
            headers
        };
        let header = |value: &str| vec![(RESULT_HEADER.to_owned(), value.to_owned())];
        assert_eq!(written(ServedReport::Served("10.0.0.7:8000")), header("10.0.0.7:8000"));
        assert_eq!(written(ServedReport::NoLbMetadata), header("fail: missing envoy lb metadata"));
        assert_eq!(
            written(ServedReport::NoServedEndpoint),
            header("fail: missing destination endpoint served metadata")
        );
    }
}
