//! Model rewrites through the whole server: a canary split over real gRPC, the rewritten body
//! and its length, sticky sessions, strict refusals, and the metrics of both model names.

mod support;

use support::{http_get, tempdir};

use std::sync::Arc;
use std::time::Duration;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::model_rewrites::ModelRewriteSettings;
use ext_proc_adapter::server::{self, RunningServer, ServerConfig};
use scheduler_core::rewrite::ModelRewrites;
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointState, PoolSnapshot, SharedPool,
};
use tonic::transport::Channel;

const CANARY: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata:
  name: tweet-summary-canary
spec:
  rules:
  - matches:
    - model: {type: Exact, value: tweet-summary}
    targets:
    - {modelRewrite: tweet-summary-v1, weight: 90}
    - {modelRewrite: tweet-summary-v2, weight: 10}
";

async fn start(rewrites: ModelRewrites) -> (RunningServer, ExternalProcessorClient<Channel>) {
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        ([127, 0, 0, 1], 8000).into(),
    ))])));
    let scheduler = Arc::new(scorers::default_scheduler().unwrap());
    let director = Arc::new(Director::new(scheduler, pool, DirectorOptions::default()));
    director.set_model_rewrites(Some(Arc::new(rewrites)));
    let config = ServerConfig { staleness_threshold: None, ..ServerConfig::loopback("pool") };
    let running = server::start_with_director(director, config).await.unwrap();
    let client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    (running, client)
}

struct Sent<'a> {
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
    chunk_bytes: usize,
}

async fn send(client: &mut ExternalProcessorClient<Channel>, sent: Sent<'_>) -> Decision {
    let mut stream = ProxyStream::open(client).await.unwrap();
    stream
        .send_request(&ProxyRequest {
            headers: sent.headers,
            body: sent.body,
            chunk_bytes: sent.chunk_bytes,
            subset: None,
        })
        .await
        .unwrap();
    let decision = stream.decision().await.unwrap();
    if matches!(decision, Decision::Routed { .. }) {
        stream.respond(None, &[b"{}"]).await.unwrap();
    }
    decision
}

fn chat(model: &str, stream: bool, text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        "max_tokens": 16,
    }))
    .unwrap()
}

/// The routed body as JSON, after checking the headers that describe it.
fn routed_body(decision: Decision) -> (serde_json::Value, Vec<(String, String)>) {
    let Decision::Routed { body, headers, .. } = decision else {
        panic!("expected a route, got {decision:?}");
    };
    let value: serde_json::Value = serde_json::from_slice(&body).expect("the body is JSON");
    (value, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

#[tokio::test]
async fn a_canary_split_rewrites_the_body_and_reports_both_models() {
    let (running, mut client) = start(ModelRewrites::from_yaml(CANARY).unwrap().with_seed(3)).await;
    let long_text = "tweet ".repeat(30_000); // 180 KB: several chunks each way
    let mut targets = Vec::new();
    for (index, (stream, chunk_bytes)) in [(false, 0), (true, 0), (true, 7_000), (false, 50_000)]
        .into_iter()
        .cycle()
        .take(40)
        .enumerate()
    {
        let text = if chunk_bytes > 0 { long_text.as_str() } else { "summarise this" };
        let body = chat("tweet-summary", stream, text);
        let headers = vec![(":path", "/v1/chat/completions"), (":method", "POST")];
        let (value, headers) =
            routed_body(send(&mut client, Sent { headers, body: &body, chunk_bytes }).await);
        let target = value["model"].as_str().expect("a model").to_owned();
        assert!(target == "tweet-summary-v1" || target == "tweet-summary-v2", "{target}");
        // Everything but the model is as the client sent it.
        let mut expected: serde_json::Value = serde_json::from_slice(&body).unwrap();
        expected["model"] = serde_json::json!(target);
        assert_eq!(value, expected, "request {index}");
        let length = serde_json::to_vec(&value).unwrap().len();
        assert_eq!(header(&headers, "content-length"), Some(length.to_string().as_str()));
        assert_eq!(header(&headers, "x-llm-d-model-name-rewrite"), Some(target.as_str()));
        assert_eq!(header(&headers, "x-gateway-model-name-rewrite"), Some(target.as_str()));
        targets.push(target);
    }
    assert!(targets.iter().any(|t| t == "tweet-summary-v1"));

    // A model no rule names passes through byte for byte, with no rewrite headers.
    let body = br#"{"model": "llama",  "prompt": "as sent"}"#;
    let headers = vec![(":path", "/v1/completions")];
    let Decision::Routed { body: echoed, headers, .. } =
        send(&mut client, Sent { headers, body, chunk_bytes: 0 }).await
    else {
        panic!("routed");
    };
    assert_eq!(echoed, body);
    assert!(headers.is_empty(), "{headers:?}");

    let metrics = http_get(running.metrics_address, "/metrics").await;
    let v1 = targets.iter().filter(|t| *t == "tweet-summary-v1").count();
    for line in [
        format!(
            "inference_objective_request_total{{model_name=\"tweet-summary\",target_model_name=\"tweet-summary-v1\"}} {v1}"
        ),
        format!(
            "inference_extension_model_rewrite_decisions_total{{model_rewrite_name=\"tweet-summary-canary\",model_name=\"tweet-summary\",target_model=\"tweet-summary-v1\"}} {v1}"
        ),
        "inference_objective_request_total{model_name=\"llama\",target_model_name=\"llama\"} 1"
            .into(),
    ] {
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_sticky_header_keeps_a_session_on_one_target() {
    let rewrites = ModelRewrites::from_yaml(CANARY).unwrap().with_sticky_header("x-session-id");
    let (running, mut client) = start(rewrites).await;
    let mut seen_targets = std::collections::HashSet::new();
    for session in 0..30 {
        let session = format!("user-{session}");
        let mut session_targets = std::collections::HashSet::new();
        for _ in 0..4 {
            let body = chat("tweet-summary", false, "hi");
            let headers =
                vec![(":path", "/v1/chat/completions"), ("x-session-id", session.as_str())];
            let (value, _) =
                routed_body(send(&mut client, Sent { headers, body: &body, chunk_bytes: 0 }).await);
            session_targets.insert(value["model"].as_str().unwrap().to_owned());
        }
        assert_eq!(session_targets.len(), 1, "{session} moved between targets");
        seen_targets.extend(session_targets);
    }
    assert!(seen_targets.contains("tweet-summary-v1"));
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn strict_rewrites_answer_404_for_unknown_models() {
    let (running, mut client) = start(ModelRewrites::from_yaml(CANARY).unwrap().strict(true)).await;
    let body = chat("llama\"injected", false, "hi");
    let headers = vec![(":path", "/v1/chat/completions")];
    let Decision::Immediate { status, body, .. } =
        send(&mut client, Sent { headers, body: &body, chunk_bytes: 0 }).await
    else {
        panic!("an unknown model is refused");
    };
    assert_eq!(status, 404);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["message"], "model 'llama\"injected' is not served by this pool");
    // A target is served under its own name.
    let body = chat("tweet-summary-v2", false, "hi");
    let headers = vec![(":path", "/v1/chat/completions")];
    let (value, headers) =
        routed_body(send(&mut client, Sent { headers, body: &body, chunk_bytes: 0 }).await);
    assert_eq!(value["model"], "tweet-summary-v2");
    assert!(headers.is_empty());
    running.shutdown(Duration::from_secs(1)).await;
}

/// The model a `chat` request is sent to.
async fn served_target(client: &mut ExternalProcessorClient<Channel>) -> String {
    let body = chat("chat", false, "hi");
    let headers = vec![(":path", "/v1/chat/completions")];
    let (value, _) = routed_body(send(client, Sent { headers, body: &body, chunk_bytes: 0 }).await);
    value["model"].as_str().unwrap().to_owned()
}

fn alias_to(target: &str) -> String {
    format!(
        "kind: InferenceModelRewrite\nmetadata: {{name: alias}}\nspec:\n  rules:\n  - matches: [{{model: {{value: chat}}}}]\n    targets: [{{modelRewrite: {target}}}]\n"
    )
}

#[tokio::test]
async fn the_rewrites_file_reloads_and_a_broken_edit_keeps_the_last_rules() {
    let dir = tempdir();
    let path = dir.join("rewrites.yaml");
    std::fs::write(&path, alias_to("chat-v1")).unwrap();
    let settings =
        ModelRewriteSettings { path: path.clone(), sticky_header: None, strict: false, seed: 1 };

    // A refused file stops the server at start, naming the file and the fault.
    std::fs::write(
        dir.join("bad.yaml"),
        "kind: InferenceModelRewrite\nmetadata: {name: x}\nspec: {rules: []}\n",
    )
    .unwrap();
    let bad = ModelRewriteSettings { path: dir.join("bad.yaml"), ..settings.clone() };
    let config = ServerConfig { model_rewrites: Some(bad), ..ServerConfig::loopback("pool") };
    let pool = Arc::new(SharedPool::default());
    let started = server::start(Arc::new(scorers::default_scheduler().unwrap()), pool, config);
    let Err(error) = started.await else { panic!("a bad rewrites file is refused") };
    let message = error.to_string();
    assert!(message.contains("bad.yaml") && message.contains("spec.rules is empty"), "{message}");

    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([EndpointState::new(Endpoint::new(
        ([127, 0, 0, 1], 8000).into(),
    ))])));
    let config = ServerConfig {
        model_rewrites: Some(settings),
        staleness_threshold: None,
        ..ServerConfig::loopback("pool")
    };
    let running =
        server::start(Arc::new(scorers::default_scheduler().unwrap()), pool, config).await.unwrap();
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    assert_eq!(served_target(&mut client).await, "chat-v1");

    std::fs::write(&path, alias_to("chat-v2")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served_target(&mut client).await != "chat-v2" {
        assert!(std::time::Instant::now() < deadline, "the rewrites file was not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The watcher reads the file every second: 1.5 s covers a look at the broken content.
    std::fs::write(&path, "rules: [").unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        served_target(&mut client).await,
        "chat-v2",
        "a broken edit keeps the last good rules"
    );
    running.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_epp_binary_refuses_a_bad_rewrites_file_by_name() {
    let dir = tempdir();
    let bad = dir.join("rewrites.yaml");
    let two_weights = "kind: InferenceModelRewrite\nmetadata: {name: split}\nspec:\n  rules:\n  - targets: [{modelRewrite: a, weight: 5}, {modelRewrite: b}]\n";
    std::fs::write(&bad, two_weights).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["--secure-serving=false", "--grpc-port", "0", "--grpc-health-port", "0"])
        .args(["--metrics-port", "0", "--model-rewrites-file"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("rewrites.yaml") && stderr.contains("InferenceModelRewrite/split"),
        "{stderr}"
    );
    assert!(stderr.contains("weights must be set on every target or on none"), "{stderr}");

    // The draw's options need the file they apply to.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["--model-rewrite-strict=true"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--model-rewrites-file"));
    let _ = std::fs::remove_dir_all(&dir);
}
