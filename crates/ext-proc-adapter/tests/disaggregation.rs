//! Prefill/decode disaggregation and data-parallel routing through the real `epp` ext-proc
//! server: the destination is the decode endpoint (or the data-parallel pod), and the prefill
//! pick (or the chosen rank) reaches the proxy as a request header.

mod support;

use std::sync::Arc;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::RunningServer;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::protocol::{DATA_PARALLEL_ENDPOINT_HEADER, PREFILL_ENDPOINT_HEADER};
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointRole,
    EndpointState, PoolSnapshot, SharedPool,
};
use support::serve;
use tonic::transport::Channel;

/// An endpoint at 127.0.0.1:`port` in `role`, with fresh metrics.
fn endpoint(port: u16, role: EndpointRole) -> EndpointState {
    let endpoint = Endpoint::new(([127, 0, 0, 1], port).into()).with_role(role);
    EndpointState::new(endpoint).with_metrics(EndpointMetrics {
        updated_at: Some(std::time::Instant::now()),
        ..EndpointMetrics::default()
    })
}

async fn start(
    config: &str,
    endpoints: Vec<EndpointState>,
) -> (RunningServer, ExternalProcessorClient<Channel>) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new(endpoints)));
    let config = EndpointPickerConfig::from_yaml(config).unwrap();
    let director = Director::from_config(
        &config,
        &scorers::builtin_registry(),
        pool,
        DirectorOptions::default(),
        ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap(),
    )
    .unwrap();
    serve(director).await
}

/// A chat completion asking about `prompt`.
fn chat(prompt: &str) -> Vec<u8> {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": prompt}]})
        .to_string()
        .into_bytes()
}

/// Opens a stream and sends one chat completion (with `extra` request headers); the stream
/// stays open (the request in flight) until it is answered or dropped.
async fn open(
    client: &mut ExternalProcessorClient<Channel>,
    body: &[u8],
    extra: &[(&str, &str)],
) -> (ProxyStream, Decision) {
    let mut stream = ProxyStream::open(client).await.unwrap();
    let mut headers = vec![(":path", "/v1/chat/completions"), (":method", "POST")];
    headers.extend_from_slice(extra);
    let request = ProxyRequest { headers, body, chunk_bytes: 0, subset: None };
    stream.send_request(&request).await.unwrap();
    let decision = stream.decision().await.unwrap();
    (stream, decision)
}

/// Sends one request and completes its response; the decision's destination and headers.
async fn route(
    client: &mut ExternalProcessorClient<Channel>,
    body: &[u8],
) -> (String, Vec<(String, String)>) {
    let (mut stream, decision) = open(client, body, &[]).await;
    let Decision::Routed { destination, headers, .. } = decision else {
        panic!("expected a route, got {decision:?}");
    };
    stream.respond(None, &[b"{}"]).await.unwrap();
    (destination, headers)
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

const ALWAYS_PD: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
";

#[tokio::test]
async fn the_decode_endpoint_is_the_destination_and_the_prefill_pick_a_header() {
    let pool = vec![
        endpoint(8001, EndpointRole::Prefill),
        endpoint(8002, EndpointRole::Decode),
        endpoint(8003, EndpointRole::Prefill),
    ];
    let (_running, mut client) = start(ALWAYS_PD, pool).await;
    for _ in 0..4 {
        let (destination, headers) = route(&mut client, &chat("Hello")).await;
        assert_eq!(destination, "127.0.0.1:8002", "decode serves the request");
        let prefill = header(&headers, PREFILL_ENDPOINT_HEADER);
        assert!(
            matches!(prefill, Some("127.0.0.1:8001" | "127.0.0.1:8003")),
            "a prefill endpoint prefills: {headers:?}"
        );
    }
}

#[tokio::test]
async fn without_a_prefill_endpoint_the_request_is_served_decode_only() {
    // One decode endpoint, one unlabelled (decode-only in llm-d's vocabulary): no endpoint
    // may prefill, so the request goes whole to decode rather than being refused.
    let pool = vec![endpoint(8001, EndpointRole::Decode), endpoint(8002, EndpointRole::Unlabeled)];
    let (_running, mut client) = start(ALWAYS_PD, pool).await;
    // A client's own prefill header must not reach the sidecar either.
    let extra = [(PREFILL_ENDPOINT_HEADER, "10.9.9.9:1")];
    let (mut stream, decision) = open(&mut client, &chat("Hello"), &extra).await;
    let Decision::Routed { destination, headers, .. } = decision else {
        panic!("decode-only service, not a refusal: {decision:?}");
    };
    assert!(matches!(destination.as_str(), "127.0.0.1:8001" | "127.0.0.1:8002"), "{destination}");
    assert_eq!(header(&headers, PREFILL_ENDPOINT_HEADER), None, "{headers:?}");
    stream.respond(None, &[b"{}"]).await.unwrap();
}

/// The value of the sample of `series` (name and labels, as exposed) in `text`, if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn each_decision_is_counted_by_the_stages_it_gave_the_request() {
    let with_prefill =
        vec![endpoint(8001, EndpointRole::Prefill), endpoint(8002, EndpointRole::Decode)];
    let (running, mut client) = start(ALWAYS_PD, with_prefill).await;
    for _ in 0..3 {
        route(&mut client, &chat("Hello")).await;
    }
    let text = running.metrics.encode();
    let labels = "plugin_name=\"disagg-profile-handler\",plugin_type=\"disagg-profile-handler\",model_name=\"m\"";
    let series = |decision: &str| {
        format!("llm_d_epp_disagg_decision_total{{{labels},decision_type=\"{decision}\"}}")
    };
    assert_eq!(sample(&text, &series("prefill-decode")), Some(3.0), "{text}");
    assert_eq!(sample(&text, &series("decode-only")), None, "{text}");
    let deprecated = "llm_d_inference_scheduler_disagg_decision_total{model_name=\"m\",decision_type=\"prefill-decode\"}";
    assert_eq!(sample(&text, deprecated), Some(3.0), "{text}");

    // No endpoint may prefill: served decode-only, and counted so.
    let decode_only = vec![endpoint(8003, EndpointRole::Decode)];
    let (running, mut client) = start(ALWAYS_PD, decode_only).await;
    route(&mut client, &chat("Hello")).await;
    let text = running.metrics.encode();
    assert_eq!(sample(&text, &series("decode-only")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &series("prefill-decode")), None, "{text}");
}

const PREFIX_PD: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters:
    blockSizeTokens: 64
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 128
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2
  - pluginRef: queue-scorer
";

#[tokio::test]
async fn a_prompt_the_decode_endpoint_already_caches_is_not_prefilled_apart() {
    let pool = vec![
        endpoint(8001, EndpointRole::Prefill),
        endpoint(8002, EndpointRole::Decode),
        endpoint(8003, EndpointRole::Decode),
    ];
    let (_running, mut client) = start(PREFIX_PD, pool).await;
    // 16 blocks of 64 tokens (256 characters): nothing cached yet, so all 1024 tokens are to
    // compute, over the 128-token threshold.
    let long: String = (0..4096).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    let body = chat(&long);
    let (decode, headers) = route(&mut client, &body).await;
    assert!(
        header(&headers, PREFILL_ENDPOINT_HEADER) == Some("127.0.0.1:8001"),
        "a cold long prompt is prefilled apart: {headers:?}"
    );

    // The decode pick's blocks are recorded off the decision's path; once they are, the same
    // prompt follows them to the same decode endpoint and needs no prefill endpoint.
    let mut attempts = 0;
    let headers = loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (destination, headers) = route(&mut client, &body).await;
        assert_eq!(destination, decode, "the cached prefix keeps its decode endpoint");
        attempts += 1;
        if header(&headers, PREFILL_ENDPOINT_HEADER).is_none() || attempts == 40 {
            break headers;
        }
    };
    assert_eq!(header(&headers, PREFILL_ENDPOINT_HEADER), None, "{headers:?}");

    // A short prompt is below the threshold whatever the cache holds.
    let (_, headers) = route(&mut client, &chat("Hi")).await;
    assert_eq!(header(&headers, PREFILL_ENDPOINT_HEADER), None, "{headers:?}");
}

const DATA_PARALLEL: &str = "
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: decode-filter
- type: max-score-picker
- type: data-parallel-profile-handler
  parameters:
    primaryPort: 8000
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: active-request-scorer
  - pluginRef: max-score-picker
";

#[tokio::test]
async fn data_parallel_ranks_share_the_load_behind_the_pod_port() {
    // Four ranks of one pod, each an endpoint; the proxy is sent to the pod's port 8000.
    let ranks: Vec<EndpointState> =
        (8001..=8004).map(|port| endpoint(port, EndpointRole::Unlabeled)).collect();
    let (_running, mut client) = start(DATA_PARALLEL, ranks).await;
    let mut in_flight = Vec::new();
    let mut chosen = Vec::new();
    for _ in 0..4 {
        let (stream, decision) = open(&mut client, &chat("Hello"), &[]).await;
        let Decision::Routed { destination, headers, .. } = decision else {
            panic!("expected a route, got {decision:?}");
        };
        assert_eq!(destination, "127.0.0.1:8000", "the destination is the pod");
        let rank = header(&headers, DATA_PARALLEL_ENDPOINT_HEADER).expect("the rank header");
        chosen.push(rank.to_owned());
        // Kept open: the request stays in flight on its rank.
        in_flight.push(stream);
    }
    chosen.sort();
    assert_eq!(
        chosen,
        ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003", "127.0.0.1:8004"],
        "each rank in flight once: the ranks share the load"
    );
    for mut stream in in_flight {
        stream.respond(None, &[b"{}"]).await.unwrap();
    }
    // Every rank is free again: the next request may take any, still behind port 8000.
    let (destination, headers) = route(&mut client, &chat("Hello")).await;
    assert_eq!(destination, "127.0.0.1:8000");
    assert!(header(&headers, DATA_PARALLEL_ENDPOINT_HEADER).is_some());
}
