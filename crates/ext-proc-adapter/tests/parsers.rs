//! Request parsers chosen by path through the whole server: llm-d-router's default list
//! (OpenAI, Anthropic, vLLM HTTP, then passthrough), and an explicit `requestHandler.parsers`
//! that refuses what it does not claim.

mod support;

use std::sync::Arc;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::RunningServer;
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{
    Director, DirectorOptions, EndpointPickerConfig, EndpointState, PoolSnapshot, SharedPool,
};
use support::{fresh_endpoint, serve};
use tonic::transport::Channel;

/// A server for `config` over two endpoints; the first is busy, so load alone decides (the
/// prefix tests turn load-aware affinity off, `affinityLoadTolerance: 0`, to see affinity alone).
async fn start(config: &str) -> (RunningServer, ExternalProcessorClient<Channel>) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([
        fresh_endpoint(8001, 50),
        fresh_endpoint(8002, 0),
    ])));
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

async fn send(client: &mut ExternalProcessorClient<Channel>, path: &str, body: &[u8]) -> Decision {
    let mut stream = ProxyStream::open(client).await.unwrap();
    let request = ProxyRequest {
        headers: vec![(":path", path), (":method", "POST")],
        body,
        chunk_bytes: 0,
        subset: None,
    };
    stream.send_request(&request).await.unwrap();
    let decision = stream.decision().await.unwrap();
    if matches!(decision, Decision::Routed { .. }) {
        stream.respond(None, &[b"{}"]).await.unwrap();
    }
    decision
}

fn routed_to(decision: &Decision) -> &str {
    match decision {
        Decision::Routed { destination, .. } => destination,
        other => panic!("expected a route, got {other:?}"),
    }
}

const QUEUE_ONLY: &str = "plugins:\n- type: queue-scorer\n";

#[tokio::test]
async fn the_default_parsers_route_each_api_and_pass_the_rest_through() {
    let (_running, mut client) = start(QUEUE_ONLY).await;
    let anthropic = br#"{"model":"claude","max_tokens":8,"system":"Be brief.",
        "messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#;
    let generate = br#"{"token_ids":[1,2,3],"sampling_params":{"max_tokens":4}}"#;
    let opaque = b"\x00\x01 not JSON at all";
    for (path, body) in [
        ("/v1/chat/completions", &br#"{"model":"m","messages":[]}"#[..]),
        ("/v1/messages", &anthropic[..]),
        ("/inference/v1/generate", &generate[..]),
        ("/v1/rerank", &opaque[..]),
        ("/v1/messages/batches", &opaque[..]),
    ] {
        let decision = send(&mut client, path, body).await;
        // The queue scorer still decides for bodies that are not read.
        assert_eq!(routed_to(&decision), "127.0.0.1:8002", "{path}");
        if let Decision::Routed { body: echoed, .. } = &decision {
            assert_eq!(echoed, body, "{path}: the body goes on untouched");
        }
    }
    // A claimed path still needs a body its parser reads.
    let decision = send(&mut client, "/v1/messages", b"not JSON").await;
    assert!(matches!(decision, Decision::Immediate { status: 400, .. }), "{decision:?}");
}

#[tokio::test]
async fn an_explicit_parser_list_refuses_paths_it_does_not_claim() {
    let (_running, mut client) = start(
        "plugins:
- type: queue-scorer
- name: openai
  type: openai-parser
requestHandler:
  parsers:
  - pluginRef: openai
",
    )
    .await;
    let decision = send(&mut client, "/v1/completions", br#"{"model":"m","prompt":"p"}"#).await;
    routed_to(&decision);
    let decision = send(&mut client, "/v1/rerank?x=1", br#"{"model":"m"}"#).await;
    let Decision::Immediate { status, body, .. } = decision else {
        panic!("expected a refusal, got {decision:?}");
    };
    assert_eq!(status, 400);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("no_parser"), "{text}");
    assert!(text.contains("no request parser claims the path '/v1/rerank?x=1'"), "{text}");
}

#[tokio::test]
async fn the_session_token_names_the_chosen_endpoint_on_the_response() {
    let config = EndpointPickerConfig::from_yaml(
        "plugins:
- type: queue-scorer
- type: session-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: session-affinity-scorer
    weight: 2
",
    )
    .unwrap();
    let endpoint = |port: u16, name: &str, waiting_queue: u32| {
        let state = fresh_endpoint(port, waiting_queue);
        EndpointState { endpoint: state.endpoint.with_name(name), ..state }
    };
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([
        endpoint(8001, "default/vllm-0", 0),
        endpoint(8002, "default/vllm-1", 50),
    ])));
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    let objectives = ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap();
    let director =
        Director::from_config(&config, &registry, pool, DirectorOptions::default(), objectives)
            .unwrap();
    let (_running, client) = serve(director).await;

    let body = br#"{"model":"m","prompt":"hello"}"#;
    let session = |token: Option<String>| {
        let mut client = client.clone();
        async move {
            let mut stream = ProxyStream::open(&mut client).await.unwrap();
            let mut headers = vec![(":path", "/v1/completions")];
            if let Some(token) = &token {
                headers.push(("x-session-token", token.as_str()));
            }
            let request = ProxyRequest { headers, body, chunk_bytes: 0, subset: None };
            stream.send_request(&request).await.unwrap();
            let decision = stream.decision().await.unwrap();
            stream.respond(None, &[b"{}"]).await.unwrap();
            (routed_to(&decision).to_owned(), stream.response_headers_set().to_vec())
        }
    };
    // The first request goes by load; the response carries the token of where it went.
    let (first, written) = session(None).await;
    assert_eq!(first, "127.0.0.1:8001");
    let token = scorers::session_affinity::session_token("default/vllm-0");
    assert_eq!(written, [("x-session-token".to_owned(), token.clone())]);
    // Echoing a token keeps its session on its endpoint though load points elsewhere.
    let busy = scorers::session_affinity::session_token("default/vllm-1");
    let (pinned, written) = session(Some(busy.clone())).await;
    assert_eq!(pinned, "127.0.0.1:8002");
    assert_eq!(written, [("x-session-token".to_owned(), busy)]);
}

/// A gRPC message framing a vLLM `GenerateRequest`: field 2 a `TokenizedInput` of `tokens`
/// (field 2, packed), or field 3 `text`; field 5 `stream`.
fn grpc_generate(text: Option<&str>, tokens: &[u8], stream: bool) -> Vec<u8> {
    let mut message = Vec::new();
    match text {
        Some(text) => {
            message.extend_from_slice(&[0x1a, text.len() as u8]);
            message.extend_from_slice(text.as_bytes());
        }
        None => {
            // Token ids below 128 are one varint byte each.
            let packed_len = tokens.len() as u8;
            message.extend_from_slice(&[0x12, packed_len + 2, 0x12, packed_len]);
            message.extend_from_slice(tokens);
        }
    }
    if stream {
        message.extend_from_slice(&[0x28, 0x01]);
    }
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    body
}

#[tokio::test]
async fn the_vllm_grpc_parser_reads_generate_requests() {
    let (_running, mut client) = start(
        "plugins:
- type: prefix-cache-scorer
  parameters: {blockSize: 4, affinityLoadTolerance: 0}
- type: max-score-picker
- name: grpc
  type: vllmgrpc-parser
requestHandler:
  parsers:
  - pluginRef: grpc
",
    )
    .await;
    const GENERATE: &str = "/vllm.grpc.engine.VllmEngine/Generate";
    let text = grpc_generate(Some("tell me a story about the sea"), &[], true);
    let decision = send(&mut client, GENERATE, &text).await;
    routed_to(&decision);
    if let Decision::Routed { body, .. } = &decision {
        assert_eq!(body, &text, "the gRPC body goes on untouched");
    }

    // The token ids are read: once recorded, the same tokens follow their first endpoint
    // though the picker would otherwise break the tie at random.
    let tokens = grpc_generate(None, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], false);
    let first = routed_to(&send(&mut client, GENERATE, &tokens).await).to_owned();
    // The pick is recorded by the prefix index's writer thread, off the decision's path.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(routed_to(&send(&mut client, GENERATE, &tokens).await), first);
    }

    let mut compressed = text.clone();
    compressed[0] = 1;
    for (body, expected) in [
        (&compressed[..], "compressed gRPC messages are not supported"),
        (&text[..text.len() - 2], "announces"),
    ] {
        let Decision::Immediate { status, body, .. } = send(&mut client, GENERATE, body).await
        else {
            panic!("expected a refusal");
        };
        assert_eq!(status, 400);
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains(expected), "{body}");
    }
    // Other methods of the service are not claimed.
    let decision = send(&mut client, "/vllm.grpc.engine.VllmEngine/HealthCheck", &[0; 5]).await;
    assert!(matches!(decision, Decision::Immediate { status: 400, .. }), "{decision:?}");
}

/// A protobuf length-delimited field: `tag`, a varint length, `bytes`.
fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    let mut length = bytes.len();
    while length >= 0x80 {
        out.push((length as u8 & 0x7f) | 0x80);
        length >>= 7;
    }
    out.push(length as u8);
    out.extend_from_slice(bytes);
}

/// A Vertex AI `PredictionService` request (`endpoint` 1, `http_body` 2) whose `HttpBody`
/// (`content_type` 1, `data` 2) carries `json`, framed as one gRPC message.
fn vertex_request(json: &str) -> Vec<u8> {
    let mut http_body = Vec::new();
    field(0x0a, b"application/json", &mut http_body);
    field(0x12, json.as_bytes(), &mut http_body);
    let mut message = Vec::new();
    field(0x0a, b"projects/p/locations/us-central1/endpoints/openapi", &mut message);
    field(0x12, &http_body, &mut message);
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    body
}

#[tokio::test]
async fn the_sglang_and_vertex_parsers_read_their_bodies() {
    let (_running, mut client) = start(
        "plugins:
- type: prefix-cache-scorer
  parameters: {blockSize: 4, affinityLoadTolerance: 0}
- type: max-score-picker
- type: sglanghttp-parser
- type: vertexai-parser
requestHandler:
  parsers:
  - pluginRef: sglanghttp-parser
  - pluginRef: vertexai-parser
",
    )
    .await;
    // SGLang's /generate: the token ids are read, so a repeated prompt follows its first
    // endpoint once the pick is recorded.
    let generate =
        br#"{"input_ids":[1,2,3,4,5,6,7,8,9,10,11,12],"sampling_params":{"max_new_tokens":8}}"#;
    let first = routed_to(&send(&mut client, "/generate", generate).await).to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(routed_to(&send(&mut client, "/generate", generate).await), first);
    }
    for (path, body) in [
        ("/generate", &br#"{"input_ids":[]}"#[..]),
        ("/generate", br#"{"text":"not pre-tokenized"}"#),
        ("/v1/generate", generate),
    ] {
        let decision = send(&mut client, path, body).await;
        assert!(
            matches!(decision, Decision::Immediate { status: 400, .. }),
            "{path}: {decision:?}"
        );
    }

    // Vertex AI: the OpenAI body inside the gRPC request is read; the request goes on as sent.
    const CHAT: &str = "/google.cloud.aiplatform.v1.PredictionService/ChatCompletions";
    let chat = vertex_request(
        r#"{"model":"google/gemma-3","messages":[{"role":"user","content":"a long shared system prompt, then a question"}]}"#,
    );
    let decision = send(&mut client, CHAT, &chat).await;
    let first = routed_to(&decision).to_owned();
    if let Decision::Routed { body, .. } = decision {
        assert_eq!(body, chat, "the gRPC body goes on untouched");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(routed_to(&send(&mut client, CHAT, &chat).await), first);
    }
    let raw = vertex_request(r#"{"model":"m","input":"hello"}"#);
    routed_to(
        &send(&mut client, "/google.cloud.aiplatform.v1.PredictionService/RawPredict", &raw).await,
    );
    let no_model = vertex_request(r#"{"messages":[{"role":"user","content":"x"}]}"#);
    let Decision::Immediate { status, body, .. } = send(&mut client, CHAT, &no_model).await else {
        panic!("a wrapped body without a model is refused");
    };
    assert_eq!(status, 400);
    assert!(String::from_utf8(body).unwrap().contains("model"));
}

#[tokio::test]
async fn the_served_endpoint_verifier_echoes_what_the_proxy_reports() {
    let (_running, client) = start(
        "plugins:
- type: queue-scorer
- type: destination-endpoint-served-verifier
",
    )
    .await;
    let body = br#"{"model":"m","prompt":"hello"}"#;
    let written = |served: Option<std::net::SocketAddr>| {
        let mut client = client.clone();
        async move {
            let mut stream = ProxyStream::open(&mut client).await.unwrap();
            let headers = vec![(":path", "/v1/completions")];
            let request = ProxyRequest { headers, body, chunk_bytes: 0, subset: None };
            stream.send_request(&request).await.unwrap();
            routed_to(&stream.decision().await.unwrap());
            stream.respond(served, &[b"{}"]).await.unwrap();
            stream.response_headers_set().to_vec()
        }
    };
    let header =
        |value: &str| vec![("x-conformance-test-served-endpoint".to_owned(), value.to_owned())];
    // The proxy fell back to another endpoint: the verifier says which.
    assert_eq!(written(Some("127.0.0.1:8001".parse().unwrap())).await, header("127.0.0.1:8001"));
    assert_eq!(written(None).await, header("fail: missing envoy lb metadata"));
}
