//! Envoy ext-proc messages as the endpoint-picker protocol uses them: reading the proxy's
//! headers, subset hint and served endpoint, and building the picker's answers (the
//! destination as a header mutation and `envoy.lb` metadata, streamed body chunks, immediate
//! responses).
//!
//! A crate of its own so that everything speaking the protocol builds the same messages: the
//! `epp` server, and the tools that stand in for it or for the proxy (the do-nothing floor
//! server of the load generator, the fuzz targets).
//!
//! ```
//! use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
//!
//! let answer = ext_proc_proto::route_to("10.0.0.1:8000", &[]);
//! let Some(Response::RequestHeaders(headers)) = answer.response else { unreachable!() };
//! let mutation = headers.response.unwrap().header_mutation.unwrap();
//! assert_eq!(mutation.set_headers[0].header.as_ref().unwrap().key, "x-gateway-destination-endpoint");
//! ```

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use scheduler_core::protocol::{
    DESTINATION_ENDPOINT_HEADER, DESTINATION_ENDPOINT_SCORES_KEY, LB_METADATA_NAMESPACE,
    SERVED_ENDPOINT_KEY, SUBSET_HINT_KEY, SUBSET_HINT_NAMESPACE,
};

/// Header name/value pairs of an Envoy header map, names lower-cased. Envoy sends values in
/// `raw_value` (bytes) in recent versions and in `value` in older ones; both are read.
pub fn header_pairs(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(map) = map else { return Vec::new() };
    map.headers
        .iter()
        .map(|header| {
            let value = if header.raw_value.is_empty() {
                header.value.clone()
            } else {
                String::from_utf8_lossy(&header.raw_value).into_owned()
            };
            (header.key.to_ascii_lowercase(), value)
        })
        .collect()
}

/// The HTTP status of a response, from its `:status` pseudo-header.
pub fn response_status(map: Option<&HeaderMap>) -> Option<u16> {
    let header = map?.headers.iter().find(|header| header.key == ":status")?;
    let value = if header.raw_value.is_empty() {
        header.value.as_bytes()
    } else {
        header.raw_value.as_slice()
    };
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// The subset hint, if the proxy sent one: `None` when absent, `Some(addresses)` otherwise
/// (entries that are not `ip:port` are skipped; an empty list means no endpoint is allowed).
pub fn subset_hint(metadata: Option<&Metadata>) -> Option<Vec<SocketAddr>> {
    let value =
        metadata?.filter_metadata.get(SUBSET_HINT_NAMESPACE)?.fields.get(SUBSET_HINT_KEY)?;
    let mut addresses = Vec::new();
    collect_addresses(value, &mut addresses);
    Some(addresses)
}

fn collect_addresses(value: &Value, out: &mut Vec<SocketAddr>) {
    match &value.kind {
        Some(Kind::StringValue(text)) => {
            out.extend(text.split(',').filter_map(|part| part.trim().parse::<SocketAddr>().ok()));
        }
        Some(Kind::ListValue(list)) => {
            for item in &list.values {
                collect_addresses(item, out);
            }
        }
        _ => {}
    }
}

/// The endpoint the proxy reports having sent the request to.
pub fn served_endpoint(metadata: Option<&Metadata>) -> Option<SocketAddr> {
    let value =
        metadata?.filter_metadata.get(LB_METADATA_NAMESPACE)?.fields.get(SERVED_ENDPOINT_KEY)?;
    match &value.kind {
        Some(Kind::StringValue(text)) => text.split(',').next()?.trim().parse().ok(),
        _ => None,
    }
}

/// What the proxy's `envoy.lb` metadata says about the served endpoint, as plugins see it.
pub fn served_report(metadata: Option<&Metadata>) -> scheduler_core::ServedReport<'_> {
    use scheduler_core::ServedReport;
    let Some(lb) =
        metadata.and_then(|metadata| metadata.filter_metadata.get(LB_METADATA_NAMESPACE))
    else {
        return ServedReport::NoLbMetadata;
    };
    match lb.fields.get(SERVED_ENDPOINT_KEY).and_then(|value| value.kind.as_ref()) {
        Some(Kind::StringValue(text)) => ServedReport::Served(text),
        _ => ServedReport::NoServedEndpoint,
    }
}

fn string_value(text: String) -> Value {
    Value { kind: Some(Kind::StringValue(text)) }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        // OVERWRITE_IF_EXISTS_OR_ADD: a client-sent destination header must never survive.
        append_action: 2,
        ..HeaderValueOption::default()
    }
}

/// The destination value of the protocol: `ip:port` of the primary, then of up to
/// `max_fallbacks` fallbacks, comma-separated.
pub fn destination_value(
    primary: SocketAddr,
    fallbacks: &[SocketAddr],
    max_fallbacks: usize,
) -> String {
    use std::fmt::Write;
    let mut value = primary.to_string();
    for fallback in fallbacks.iter().take(max_fallbacks) {
        // Writing into a String cannot fail.
        let _ = write!(value, ",{fallback}");
    }
    value
}

/// The answer to the request headers once the destination is known: the destination header
/// (plus `extra_headers`), a cleared route cache so the proxy re-routes on it, and the same
/// destination in `envoy.lb` dynamic metadata.
pub fn route_to(destination: &str, extra_headers: &[(&str, &str)]) -> ProcessingResponse {
    route_to_with_scores(destination, extra_headers, &[])
}

/// [`route_to`], with each destination endpoint's score from the scheduler (`ip:port`,
/// score) under [`DESTINATION_ENDPOINT_SCORES_KEY`] in the same metadata namespace, when
/// `scores` is not empty.
pub fn route_to_with_scores(
    destination: &str,
    extra_headers: &[(&str, &str)],
    scores: &[(String, f64)],
) -> ProcessingResponse {
    let mut headers = Vec::with_capacity(extra_headers.len() + 1);
    headers.push((DESTINATION_ENDPOINT_HEADER, destination));
    headers.extend_from_slice(extra_headers);
    let mut lb = Struct::default();
    lb.fields.insert(DESTINATION_ENDPOINT_HEADER.to_owned(), string_value(destination.to_owned()));
    if !scores.is_empty() {
        let mut by_endpoint = Struct::default();
        for (endpoint, score) in scores {
            by_endpoint
                .fields
                .insert(endpoint.clone(), Value { kind: Some(Kind::NumberValue(*score)) });
        }
        lb.fields.insert(
            DESTINATION_ENDPOINT_SCORES_KEY.to_owned(),
            Value { kind: Some(Kind::StructValue(by_endpoint)) },
        );
    }
    let mut dynamic_metadata = Struct::default();
    dynamic_metadata
        .fields
        .insert(LB_METADATA_NAMESPACE.to_owned(), Value { kind: Some(Kind::StructValue(lb)) });
    ProcessingResponse { dynamic_metadata: Some(dynamic_metadata), ..set_request_headers(&headers) }
}

/// The answer to the request headers that sets `headers` (each overwriting what the client
/// sent under that name) and clears the route cache, so the proxy matches its routes again on
/// the new headers. No destination: for a processor in front of the picker, such as the
/// body-based router.
pub fn set_request_headers(headers: &[(&str, &str)]) -> ProcessingResponse {
    let set_headers = headers.iter().map(|(key, value)| set_header(key, value)).collect();
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation { set_headers, remove_headers: Vec::new() }),
                clear_route_cache: true,
                ..CommonResponse::default()
            }),
        })),
        ..ProcessingResponse::default()
    }
}

/// `response` (an answer to the request headers) also removing the request headers `names`:
/// headers only the picker may set, which a client sent but the decision does not set.
pub fn with_removed_request_headers(
    mut response: ProcessingResponse,
    names: &[&str],
) -> ProcessingResponse {
    if let Some(processing_response::Response::RequestHeaders(HeadersResponse {
        response: Some(CommonResponse { header_mutation: Some(mutation), .. }),
    })) = response.response.as_mut()
    {
        mutation.remove_headers.extend(names.iter().map(|name| (*name).to_owned()));
    }
    response
}

/// An empty (pass-through) answer to the request headers: nothing changed, routes kept.
pub fn continue_request_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse::default()),
        })),
        ..ProcessingResponse::default()
    }
}

/// One chunk of a body streamed back to the proxy (full-duplex streamed mode).
pub fn body_chunk(request_side: bool, body: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    let response = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..StreamedBodyResponse::default()
                })),
            }),
            ..CommonResponse::default()
        }),
    };
    ProcessingResponse {
        response: Some(if request_side {
            processing_response::Response::RequestBody(response)
        } else {
            processing_response::Response::ResponseBody(response)
        }),
        ..ProcessingResponse::default()
    }
}

/// Adds `attributes` (namespace, field, number) to the dynamic metadata of `response`,
/// merging with namespaces it already carries: what usage reporters hand back to the proxy.
pub fn add_dynamic_numbers<'a>(
    response: &mut ProcessingResponse,
    attributes: impl IntoIterator<Item = (&'a str, &'a str, f64)>,
) {
    let metadata = response.dynamic_metadata.get_or_insert_with(Struct::default);
    for (namespace, name, number) in attributes {
        let entry = metadata
            .fields
            .entry(namespace.to_owned())
            .or_insert_with(|| Value { kind: Some(Kind::StructValue(Struct::default())) });
        if !matches!(entry.kind, Some(Kind::StructValue(_))) {
            entry.kind = Some(Kind::StructValue(Struct::default()));
        }
        if let Some(Kind::StructValue(fields)) = &mut entry.kind {
            fields.fields.insert(name.to_owned(), Value { kind: Some(Kind::NumberValue(number)) });
        }
    }
}

/// An empty (pass-through) answer to the response headers.
pub fn continue_response_headers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(HeadersResponse {
            response: Some(CommonResponse::default()),
        })),
        ..ProcessingResponse::default()
    }
}

/// The answer to the response headers that sets `headers` on the response to the client
/// (each overwriting one the model server sent under that name).
pub fn set_response_headers(headers: &[(&str, &str)]) -> ProcessingResponse {
    let set_headers = headers.iter().map(|(key, value)| set_header(key, value)).collect();
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation { set_headers, remove_headers: Vec::new() }),
                ..CommonResponse::default()
            }),
        })),
        ..ProcessingResponse::default()
    }
}

/// An empty (pass-through) answer to trailers.
pub fn continue_trailers(request_side: bool) -> ProcessingResponse {
    let trailers = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request_side {
            processing_response::Response::RequestTrailers(trailers)
        } else {
            processing_response::Response::ResponseTrailers(trailers)
        }),
        ..ProcessingResponse::default()
    }
}

/// An immediate response ending the request with `status` and a JSON error body.
pub fn immediate(status: u16, code: &str, message: &str) -> ProcessingResponse {
    immediate_with_headers(status, code, message, &[])
}

/// [`immediate`], with `extra_headers` set on the answer too.
pub fn immediate_with_headers(
    status: u16,
    code: &str,
    message: &str,
    extra_headers: &[(&str, &str)],
) -> ProcessingResponse {
    let body =
        serde_json::json!({ "error": { "code": code, "message": message, "status": status } });
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus { code: i32::from(status) }),
            headers: Some(HeaderMutation {
                set_headers: std::iter::once(("content-type", "application/json"))
                    .chain(extra_headers.iter().copied())
                    .map(|(key, value)| set_header(key, value))
                    .collect(),
                remove_headers: Vec::new(),
            }),
            body: body.to_string().into_bytes(),
            details: format!("epp_{code}"),
            ..ImmediateResponse::default()
        })),
        ..ProcessingResponse::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn metadata(namespace: &str, key: &str, value: Value) -> Metadata {
        let mut inner = Struct::default();
        inner.fields.insert(key.to_owned(), value);
        let mut metadata = Metadata::default();
        metadata.filter_metadata.insert(namespace.to_owned(), inner);
        metadata
    }

    #[test]
    fn routing_headers_a_decision_does_not_set_are_removed() {
        let response = with_removed_request_headers(
            route_to("10.0.0.1:8000", &[("x-prefiller-host-port", "10.0.0.2:8000")]),
            &["x-encoder-hosts-ports"],
        );
        let Some(processing_response::Response::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse { header_mutation: Some(mutation), .. }),
        })) = response.response
        else {
            panic!("a request-headers answer with a mutation");
        };
        assert_eq!(mutation.remove_headers, ["x-encoder-hosts-ports"]);
        let set: Vec<&str> = mutation
            .set_headers
            .iter()
            .filter_map(|option| option.header.as_ref().map(|header| header.key.as_str()))
            .collect();
        assert_eq!(set, [DESTINATION_ENDPOINT_HEADER, "x-prefiller-host-port"]);
        // An answer without a mutation is left as it is.
        let untouched = with_removed_request_headers(continue_request_headers(), &["x"]);
        assert_eq!(untouched, continue_request_headers());
    }

    #[test]
    fn subset_hint_accepts_lists_and_comma_strings() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![string_value("10.0.0.1:80".into()), string_value("bad".into())],
            })),
        };
        let hint = subset_hint(Some(&metadata(SUBSET_HINT_NAMESPACE, SUBSET_HINT_KEY, list)));
        assert_eq!(hint, Some(vec!["10.0.0.1:80".parse().unwrap()]));
        let text = string_value("10.0.0.1:80, 10.0.0.2:80".into());
        let hint = subset_hint(Some(&metadata(SUBSET_HINT_NAMESPACE, SUBSET_HINT_KEY, text)));
        assert_eq!(hint.map(|h| h.len()), Some(2));
        assert_eq!(subset_hint(None), None);
        assert_eq!(subset_hint(Some(&Metadata::default())), None);
    }

    #[test]
    fn served_endpoint_is_read_from_lb_metadata() {
        let served = string_value("10.0.0.9:8000".into());
        let metadata = metadata(LB_METADATA_NAMESPACE, SERVED_ENDPOINT_KEY, served);
        assert_eq!(served_endpoint(Some(&metadata)), Some("10.0.0.9:8000".parse().unwrap()));
    }

    #[test]
    fn set_request_headers_overwrites_and_reroutes() {
        let answer = set_request_headers(&[("x-a", "1"), ("x-b", "2")]);
        assert!(answer.dynamic_metadata.is_none(), "no destination metadata");
        let Some(processing_response::Response::RequestHeaders(headers)) = answer.response else {
            panic!("a request headers answer");
        };
        let common = headers.response.unwrap();
        assert!(common.clear_route_cache);
        let set: Vec<(String, Vec<u8>, i32)> = common
            .header_mutation
            .unwrap()
            .set_headers
            .into_iter()
            .map(|option| {
                let header = option.header.unwrap();
                (header.key, header.raw_value, option.append_action)
            })
            .collect();
        assert_eq!(set, vec![("x-a".into(), b"1".to_vec(), 2), ("x-b".into(), b"2".to_vec(), 2)]);
    }

    #[test]
    fn raw_values_are_preferred() {
        let map = HeaderMap {
            headers: vec![
                HeaderValue { key: "X-A".into(), value: String::new(), raw_value: b"raw".to_vec() },
                HeaderValue { key: "b".into(), value: "plain".into(), raw_value: Vec::new() },
            ],
        };
        assert_eq!(
            header_pairs(Some(&map)),
            vec![("x-a".to_owned(), "raw".to_owned()), ("b".to_owned(), "plain".to_owned())]
        );
    }
}
