//! `request-attribute-reporter` through the whole server: the value its CEL expression
//! computes from the response's usage reaches the proxy as dynamic metadata on the last
//! response-body answer, for a JSON response and for a stream that reports usage at its end.

mod support;

use std::sync::Arc;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::RunningServer;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{Director, DirectorOptions, EndpointPickerConfig, PoolSnapshot, SharedPool};
use support::{fresh_endpoint, serve};
use tonic::transport::Channel;

/// llm-d-router's integration config for the reporter, less its test-only metrics source
/// and the parser reference in the profile.
const CONFIG: &str = r#"
plugins:
  - type: openai-parser
  - type: queue-scorer
  - name: total-tokens-cost-reporter
    type: request-attribute-reporter
    parameters:
      attributes:
        - key:
            namespace: envoy.lb
            name: x-gateway-inference-request-cost
          expression: |
            usage.completion_tokens
          condition: "has(usage.completion_tokens)"
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
requestHandler:
  parsers:
  - pluginRef: openai-parser
"#;

const COST: &str = "x-gateway-inference-request-cost";

async fn start(config: &str) -> (RunningServer, ExternalProcessorClient<Channel>) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([fresh_endpoint(8001, 0)])));
    let director = Director::from_config(
        &EndpointPickerConfig::from_yaml(config).unwrap(),
        &scorers::builtin_registry(),
        pool,
        DirectorOptions::default(),
        ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap(),
    )
    .unwrap();
    serve(director).await
}

/// Routes a chat completion, answers it with `chunks`, and returns the stream afterwards.
async fn exchange(client: &mut ExternalProcessorClient<Channel>, chunks: &[&[u8]]) -> ProxyStream {
    let mut stream = ProxyStream::open(client).await.unwrap();
    let body = br#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#;
    let request = ProxyRequest {
        headers: vec![(":path", "/v1/chat/completions"), (":method", "POST")],
        body,
        chunk_bytes: 0,
        subset: None,
    };
    stream.send_request(&request).await.unwrap();
    assert!(matches!(stream.decision().await.unwrap(), Decision::Routed { .. }));
    let echoed = stream.respond(None, chunks).await.unwrap();
    assert_eq!(echoed, chunks.concat(), "the body passes unchanged");
    stream
}

#[tokio::test]
async fn a_json_response_reports_its_completion_tokens() {
    let (_running, mut client) = start(CONFIG).await;
    let response: &[u8] =
        br#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":17,"total_tokens":28}}"#;
    let stream = exchange(&mut client, &[response]).await;
    assert_eq!(stream.response_metadata_number("envoy.lb", COST), Some(17.0));
}

#[tokio::test]
async fn a_stream_reports_the_usage_of_its_last_chunk() {
    let (_running, mut client) = start(CONFIG).await;
    let chunks: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tok",
        b"ens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n",
    ];
    let stream = exchange(&mut client, &chunks).await;
    assert_eq!(stream.response_metadata_number("envoy.lb", COST), Some(5.0));
}

#[tokio::test]
async fn no_usage_reports_nothing_and_namespaces_are_kept_apart() {
    let (_running, mut client) = start(CONFIG).await;
    let stream = exchange(&mut client, &[b"{\"choices\":[]}"]).await;
    assert!(!stream.has_response_metadata(), "a zero count is not reported");

    let custom = CONFIG
        .replace("namespace: envoy.lb", "namespace: billing")
        .replace("usage.completion_tokens\n", "usage.prompt_tokens + usage.total_tokens\n");
    let (_running, mut client) = start(&custom).await;
    let response: &[u8] =
        br#"{"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
    let stream = exchange(&mut client, &[response]).await;
    assert_eq!(stream.response_metadata_number("billing", COST), Some(5.0));
    assert_eq!(stream.response_metadata_number("envoy.lb", COST), None);
}

#[test]
fn bad_parameters_are_refused_naming_them() {
    let load = |config: &str| {
        let config = EndpointPickerConfig::from_yaml(config).unwrap();
        let pool = Arc::new(SharedPool::new(PoolSnapshot::new([fresh_endpoint(8001, 0)])));
        Director::from_config(
            &config,
            &scorers::builtin_registry(),
            pool,
            DirectorOptions::default(),
            ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let unknown = CONFIG.replace("condition:", "metric: x\n          condition:");
    assert!(load(&unknown).contains("metric"), "{}", load(&unknown));
    let bad = CONFIG.replace("has(usage.completion_tokens)", "has(usage.completion_tokens");
    assert!(load(&bad).contains("condition"), "{}", load(&bad));
}
