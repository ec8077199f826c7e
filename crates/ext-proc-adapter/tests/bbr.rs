//! `epp bbr`, the body-based router, over real gRPC streams on loopback: headers set from the
//! body's model, bodies echoed intact, errors, passthrough, the adapters file and its reload,
//! adapters learned from a real HTTP `/v1/models` stand-in, metrics, and the binary itself.

mod support;

use support::{http_get, tempdir};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, body_mutation, processing_request,
    processing_response,
};
use ext_proc_adapter::bbr::{self, BbrConfig, RunningBbr};
use http_body_util::Full;
use hyper::service::service_fn;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// What the router answered on one stream.
#[derive(Debug, Default)]
struct Answers {
    /// The answer to the request headers.
    headers: Option<CommonResponse>,
    /// The request body as streamed back, and the size of each piece.
    body: Vec<u8>,
    pieces: Vec<usize>,
    /// An immediate response: status and JSON body.
    immediate: Option<(u16, serde_json::Value)>,
}

impl Answers {
    fn set_headers(&self) -> Vec<(String, String)> {
        let Some(mutation) = self.headers.as_ref().and_then(|h| h.header_mutation.as_ref()) else {
            return Vec::new();
        };
        mutation
            .set_headers
            .iter()
            .filter_map(|option| option.header.as_ref())
            .map(|h| (h.key.clone(), String::from_utf8_lossy(&h.raw_value).into_owned()))
            .collect()
    }

    fn base_model(&self) -> Option<String> {
        self.set_headers().into_iter().find(|(k, _)| k == bbr::BASE_MODEL_NAME_HEADER).map(|h| h.1)
    }
}

async fn client(address: SocketAddr) -> ExternalProcessorClient<Channel> {
    ExternalProcessorClient::connect(format!("http://{address}")).await.unwrap()
}

fn message(request: processing_request::Request) -> ProcessingRequest {
    ProcessingRequest { request: Some(request), ..ProcessingRequest::default() }
}

/// Sends headers and body chunks as the proxy does in full-duplex streamed mode, without
/// waiting, then reads the answers until the request side is complete.
async fn exchange(
    client: &mut ExternalProcessorClient<Channel>,
    headers: &[(&str, &str)],
    chunks: &[&[u8]],
) -> Answers {
    let (sender, receiver) = mpsc::channel(64);
    let mut answers = client.process(ReceiverStream::new(receiver)).await.unwrap().into_inner();
    let map = HeaderMap {
        headers: headers
            .iter()
            .map(|(key, value)| HeaderValue {
                key: (*key).to_owned(),
                value: String::new(),
                raw_value: value.as_bytes().to_vec(),
            })
            .collect(),
    };
    let end_of_stream = chunks.is_empty();
    let headers = HttpHeaders { headers: Some(map), end_of_stream, ..HttpHeaders::default() };
    sender.send(message(processing_request::Request::RequestHeaders(headers))).await.unwrap();
    for (index, chunk) in chunks.iter().enumerate() {
        let body = HttpBody {
            body: chunk.to_vec(),
            end_of_stream: index + 1 == chunks.len(),
            ..HttpBody::default()
        };
        // The router may answer (413) and close before every chunk is sent.
        if sender.send(message(processing_request::Request::RequestBody(body))).await.is_err() {
            break;
        }
    }
    let mut out = Answers::default();
    let mut body_ended = chunks.is_empty();
    while !(out.headers.is_some() && body_ended) {
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("the router answers in time")
            .expect("the stream stays up")
            .expect("the router answers before closing");
        match answer.response {
            Some(processing_response::Response::ImmediateResponse(immediate)) => {
                let status = immediate.status.map_or(0, |s| s.code) as u16;
                out.immediate = Some((status, serde_json::from_slice(&immediate.body).unwrap()));
                return out;
            }
            Some(processing_response::Response::RequestHeaders(headers)) => {
                out.headers = Some(headers.response.unwrap_or_default());
            }
            Some(processing_response::Response::RequestBody(body)) => {
                let mutation = body.response.and_then(|r| r.body_mutation).and_then(|m| m.mutation);
                let Some(body_mutation::Mutation::StreamedResponse(piece)) = mutation else {
                    panic!("bodies go back streamed");
                };
                assert!(out.headers.is_some(), "the headers are answered before the body");
                out.pieces.push(piece.body.len());
                out.body.extend_from_slice(&piece.body);
                body_ended = piece.end_of_stream;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    out
}

const CHAT: &[(&str, &str)] =
    &[(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];

fn chat_body(model: &str) -> Vec<u8> {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hi"}}]}}"#).into_bytes()
}

fn adapters_yaml(base: &str, adapters: &[&str]) -> String {
    let list: String = adapters.iter().map(|a| format!("    - {a}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: adapters\n  labels:\n    inference.networking.k8s.io/bbr-managed: \"true\"\ndata:\n  baseModel: {base}\n  adapters: |\n{list}"
    )
}

async fn start(config: BbrConfig) -> (RunningBbr, ExternalProcessorClient<Channel>) {
    let running = bbr::start(config).await.unwrap();
    let client = client(running.grpc_address).await;
    (running, client)
}

async fn eventually_base(client: &mut ExternalProcessorClient<Channel>, model: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answers = exchange(client, CHAT, &[&chat_body(model)]).await;
        if answers.base_model().as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "base of {model} never became {want}: {answers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_model_headers_are_set_the_route_cache_cleared_and_the_body_kept() {
    let (running, mut client) = start(BbrConfig::loopback()).await;
    let body = chat_body("meta-llama/Llama-3.1-8B");
    let answers = exchange(&mut client, CHAT, &[&body]).await;
    assert!(answers.headers.as_ref().unwrap().clear_route_cache, "routes are matched again");
    assert_eq!(
        answers.set_headers(),
        vec![
            ("x-gateway-model-name".to_owned(), "meta-llama/Llama-3.1-8B".to_owned()),
            ("x-gateway-base-model-name".to_owned(), "meta-llama/Llama-3.1-8B".to_owned()),
        ],
        "a model nobody described is its own base"
    );
    assert_eq!(answers.body, body);
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_large_body_in_many_messages_comes_back_whole_in_bounded_pieces() {
    let (running, mut client) = start(BbrConfig::loopback()).await;
    let mut body = br#"{"messages":[{"role":"user","content":""#.to_vec();
    body.extend((0..200_000).map(|i| b"abcdefghij"[i % 10]));
    body.extend_from_slice(br#""}],"model":"m","stream":true}"#);
    let chunks: Vec<&[u8]> = body.chunks(30_000).collect();
    assert!(chunks.len() > 5 && body.len() > 3 * 62_000);
    let answers = exchange(&mut client, CHAT, &chunks).await;
    assert_eq!(answers.base_model().as_deref(), Some("m"), "model found after the prompt");
    assert!(answers.pieces.iter().all(|&piece| piece <= 62_000), "{:?}", answers.pieces);
    assert_eq!(answers.pieces.len(), body.len().div_ceil(62_000));
    assert!(answers.body == body, "the echoed body equals the input");
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bodies_without_a_usable_model_are_400_naming_the_problem() {
    let (running, mut client) = start(BbrConfig::loopback()).await;
    let cases: [(&[u8], &str, &str); 4] = [
        (br#"{"messages":[]}"#, "missing_model", "no `model`"),
        (br#"{"model":42,"prompt":"x"}"#, "bad_body", "must be a string"),
        (b"model=llama&prompt=hi", "bad_body", "not a JSON object"),
        (br#"["model","llama"]"#, "bad_body", "not a JSON object"),
    ];
    for (body, code, problem) in cases {
        let answers = exchange(&mut client, CHAT, &[body]).await;
        let (status, error) = answers.immediate.expect("an immediate response");
        assert_eq!(status, 400);
        assert_eq!(error["error"]["code"], code);
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(problem), "{message}");
    }
    let injected = exchange(&mut client, CHAT, &[br#"{"model":"a\r\nx-evil: 1"}"#]).await;
    assert_eq!(injected.immediate.map(|i| i.0), Some(400), "no header injection");
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn other_requests_pass_through_untouched() {
    let (running, mut client) = start(BbrConfig::loopback()).await;
    let healthz = exchange(&mut client, &[(":method", "GET"), (":path", "/healthz")], &[]).await;
    assert!(healthz.set_headers().is_empty());
    assert!(!healthz.headers.unwrap().clear_route_cache);

    // Not an inference API, although the body names a model: unread, echoed.
    let audio = [(":method", "POST"), (":path", "/v1/audio/foo")];
    let body = chat_body("whisper");
    let answers = exchange(&mut client, &audio, &[&body[..10], &body[10..]]).await;
    assert!(answers.set_headers().is_empty());
    assert_eq!(answers.body, body);

    // An inference path with a body that is not JSON, say a multipart upload.
    let multipart =
        [(":path", "/v1/completions"), ("content-type", "multipart/form-data; boundary=x")];
    let answers = exchange(&mut client, &multipart, &[b"--x\r\n"]).await;
    assert!(answers.set_headers().is_empty() && answers.immediate.is_none());
    assert_eq!(answers.body, b"--x\r\n");
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_before_they_end() {
    let config = BbrConfig { max_body_bytes: 1_000, ..BbrConfig::loopback() };
    let (running, mut client) = start(config).await;
    let chunk = vec![b' '; 600];
    let answers = exchange(&mut client, CHAT, &[&chunk, &chunk, &chunk, &chunk]).await;
    let (status, error) = answers.immediate.expect("an immediate response");
    assert_eq!((status, error["error"]["code"].as_str()), (413, Some("too_large")));
    let within = exchange(&mut client, CHAT, &[&chat_body("m")]).await;
    assert_eq!(within.base_model().as_deref(), Some("m"));
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_adapters_file_maps_adapters_and_reloads_keeping_the_last_good_map() {
    let dir = tempdir();
    let file = dir.join("adapters.yaml");
    std::fs::write(&file, adapters_yaml("meta-llama/Llama-3.1-8B", &["sql-lora", "chat-lora"]))
        .unwrap();
    let config = BbrConfig { adapters_file: Some(file.clone()), ..BbrConfig::loopback() };
    let (running, mut client) = start(config).await;
    let answers = exchange(&mut client, CHAT, &[&chat_body("sql-lora")]).await;
    assert_eq!(
        answers.set_headers(),
        vec![
            ("x-gateway-model-name".to_owned(), "sql-lora".to_owned()),
            ("x-gateway-base-model-name".to_owned(), "meta-llama/Llama-3.1-8B".to_owned()),
        ]
    );

    std::fs::write(&file, adapters_yaml("qwen", &["sql-lora"])).unwrap();
    eventually_base(&mut client, "sql-lora", "qwen").await;
    eventually_base(&mut client, "chat-lora", "chat-lora").await;

    // A bad edit is refused; the last good map stays.
    let conflict = format!("{}---\n{}", adapters_yaml("a", &["x"]), adapters_yaml("b", &["x"]));
    std::fs::write(&file, conflict).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let answers = exchange(&mut client, CHAT, &[&chat_body("sql-lora")]).await;
    assert_eq!(answers.base_model().as_deref(), Some("qwen"));
    running.shutdown(Duration::from_secs(1)).await;
}

/// A real HTTP server standing in for a model server's `/v1/models`; the answer can change.
async fn models_server(answer: Arc<Mutex<String>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let mut response = if request.uri().path() == "/v1/models" {
                        hyper::Response::new(Full::new(bytes::Bytes::from(answer.lock().clone())))
                    } else {
                        let mut missing = hyper::Response::new(Full::default());
                        *missing.status_mut() = hyper::StatusCode::NOT_FOUND;
                        missing
                    };
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    address
}

fn vllm_models(base: &str, adapter: &str) -> String {
    format!(
        r#"{{"object":"list","data":[{{"id":"{base}","object":"model","root":"{base}","parent":null}},{{"id":"{adapter}","object":"model","root":"/adapters/{adapter}","parent":"{base}"}}]}}"#
    )
}

fn write_endpoints(path: &Path, addresses: &[SocketAddr]) {
    let text: String = addresses
        .iter()
        .map(|a| format!("- {{address: {}, port: {}}}\n", a.ip(), a.port()))
        .collect();
    std::fs::write(path, if text.is_empty() { "[]\n".to_owned() } else { text }).unwrap();
}

#[tokio::test]
async fn adapters_are_learned_from_the_model_servers_and_the_file_wins() {
    let llama = Arc::new(Mutex::new(vllm_models("meta-llama/Llama-3.1-8B", "sql-lora")));
    let good = models_server(Arc::clone(&llama)).await;
    let garbage = models_server(Arc::new(Mutex::new("<html>busy</html>".to_owned()))).await;
    // Nothing listens there: refused connections are skipped too.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dir = tempdir();
    let endpoints = dir.join("pool.yaml");
    write_endpoints(&endpoints, &[garbage, closed, good]);
    let adapters = dir.join("adapters.yaml");
    std::fs::write(&adapters, adapters_yaml("pinned-base", &["pinned-lora"])).unwrap();
    let config = BbrConfig {
        endpoints_file: Some(endpoints.clone()),
        adapters_file: Some(adapters.clone()),
        models_refresh_interval: Duration::from_millis(100),
        ..BbrConfig::loopback()
    };
    let (running, mut client) = start(config).await;
    eventually_base(&mut client, "sql-lora", "meta-llama/Llama-3.1-8B").await;
    eventually_base(&mut client, "pinned-lora", "pinned-base").await;

    // The server now reports the pinned adapter under another base: the file still wins.
    *llama.lock() = vllm_models("other-base", "pinned-lora");
    let deadline = Instant::now() + Duration::from_secs(10);
    while running.base_models.learned().base_of("pinned-lora") != Some("other-base") {
        assert!(Instant::now() < deadline, "the new answer is never learned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually_base(&mut client, "pinned-lora", "pinned-base").await;
    eventually_base(&mut client, "sql-lora", "sql-lora").await;

    // An endpoint leaving the file takes what it taught along.
    write_endpoints(&endpoints, &[]);
    std::fs::write(&adapters, "").unwrap();
    eventually_base(&mut client, "pinned-lora", "pinned-lora").await;
    running.shutdown(Duration::from_secs(1)).await;
}

fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_every_outcome_and_routed_base_models() {
    let config = BbrConfig { max_body_bytes: 200, ..BbrConfig::loopback() };
    let (running, mut client) = start(config).await;
    exchange(&mut client, CHAT, &[&chat_body("llama")]).await;
    exchange(&mut client, CHAT, &[&chat_body("llama")]).await;
    // A quote in the name, escaped in JSON: the label must keep it inside the value.
    exchange(&mut client, CHAT, &[br#"{"model":"qwen\"} 9 forged"}"#]).await;
    exchange(&mut client, &[(":path", "/healthz")], &[]).await;
    exchange(&mut client, CHAT, &[br#"{"prompt":"x"}"#]).await;
    exchange(&mut client, CHAT, &[b"not json"]).await;
    exchange(&mut client, CHAT, &[br#"{"model":"a\nforged_total 1"}"#]).await;
    exchange(&mut client, CHAT, &[&[b' '; 300]]).await;
    let page = http_get(running.metrics_address, "/metrics").await;
    for (outcome, count) in [
        ("routed", 3.0),
        ("passthrough", 1.0),
        ("missing_model", 1.0),
        ("bad_body", 2.0),
        ("too_large", 1.0),
    ] {
        let series = format!("bbr_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&page, &series), Some(count), "{series} in {page}");
    }
    assert_eq!(sample(&page, "bbr_routed_requests_total{base_model=\"llama\"}"), Some(2.0));
    let escaped = r#"bbr_routed_requests_total{base_model="qwen\"} 9 forged"}"#;
    assert_eq!(sample(&page, escaped), Some(1.0), "{page}");
    assert!(http_get(running.metrics_address, "/other").await.starts_with("HTTP/1.1 404"));
    running.shutdown(Duration::from_secs(1)).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn health(address: SocketAddr, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(format!("http://{address}")).ok()?.connect().await.ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_owned() })
        .await
        .ok()?
        .into_inner();
    ServingStatus::try_from(response.status).ok()
}

/// Kills the child when the test ends, passing or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_health_and_refuses_a_bad_adapters_file() {
    let dir = tempdir();
    let adapters = dir.join("adapters.yaml");
    std::fs::write(&adapters, adapters_yaml("llama", &["sql-lora"])).unwrap();
    let (grpc, health_port, metrics) = (free_port(), free_port(), free_port());
    let ports = [grpc, health_port, metrics].map(|port| port.to_string());
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
            .args(["bbr", "--secure-serving=false", "--bind-address", "127.0.0.1"])
            .args(["--grpc-port", &ports[0], "--grpc-health-port", &ports[1]])
            .args(["--metrics-port", &ports[2], "--adapters-file"])
            .arg(&adapters)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let health_address = SocketAddr::from(([127, 0, 0, 1], health_port));
    let deadline = Instant::now() + Duration::from_secs(20);
    for service in ["liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        while health(health_address, service).await != Some(ServingStatus::Serving) {
            assert!(Instant::now() < deadline, "{service} never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut client = client(SocketAddr::from(([127, 0, 0, 1], grpc))).await;
    let answers = exchange(&mut client, CHAT, &[&chat_body("sql-lora")]).await;
    assert_eq!(answers.base_model().as_deref(), Some("llama"));

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "kind: ConfigMap\nmetadata: {name: broken}\ndata: {adapters: \"- a\"}\n")
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_epp"))
        .args(["bbr", "--secure-serving=false", "--grpc-port", "0", "--grpc-health-port", "0"])
        .args(["--metrics-port", "0", "--adapters-file"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("adapters file") && stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("ConfigMap 'broken'") && stderr.contains("baseModel"), "{stderr}");
}
