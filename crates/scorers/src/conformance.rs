//! `destination-endpoint-served-verifier`: a plugin of llm-d-router's conformance tests that
//! echoes, on the response, the endpoint the proxy says served the request.
//!
//! Matches llm-d-router's `requestcontrol/test/responsereceived`: once the response's headers
//! come, header `x-conformance-test-served-endpoint` is set to the proxy's
//! `x-gateway-destination-endpoint-served` (from its `envoy.lb` metadata) as written, or to
//! `fail: missing envoy lb metadata` / `fail: missing destination endpoint served metadata`
//! when the proxy reported none. Only the ext-proc server hears from a proxy; elsewhere the
//! plugin writes nothing. It takes no parameters.

use scheduler_core::{ResponseHeaders, SchedulingResult, ServedReport};

/// llm-d type name.
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

#[cfg(test)]
mod tests {
    use super::*;

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
