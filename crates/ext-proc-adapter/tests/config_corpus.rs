//! Real `EndpointPickerConfig` files, collected from llm-d-router and GIE at several versions
//! (`tests/data/configs/`, each with its source and commit in a header comment), each loaded
//! unchanged by the real server, which then routes a request.
//!
//! A file may say `# Pending: <why>` in its header when it needs a plugin not built yet (with
//! the issue that builds it, when there is one); it must then be refused as naming an unknown
//! plugin type that the marker names too (or, for the precise prefix plugins the marker names,
//! as needing the `kv-events` feature), and the marker goes once the plugin lands. A file the Go
//! loader refuses too (a typo in a guide) says `# Expect-error: <text>`, and the error must
//! contain that text. A file that needs plugins llm-d-router ranks alpha says
//! `# Experimental: <why>`: it must be refused as experimental by default, and is loaded with
//! experimental plugins allowed (as the Go EPP runs it, with `--allow-experimental-plugins`).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{Director, DirectorOptions, EndpointPickerConfig, PoolSnapshot, SharedPool};
use support::{fresh_endpoint, serve};

fn corpus() -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
        .collect();
    files.sort();
    files
}

/// What a file's header says.
#[derive(Default)]
struct Header<'a> {
    source: Option<&'a str>,
    pending: Option<&'a str>,
    expected_error: Option<&'a str>,
    experimental: bool,
}

fn header(text: &str) -> Header<'_> {
    let mut header = Header::default();
    for line in text.lines().take_while(|line| line.starts_with('#')) {
        if let Some(value) = line.strip_prefix("# Source: ") {
            header.source = Some(value);
        } else if let Some(value) = line.strip_prefix("# Pending: ") {
            header.pending = Some(value);
        } else if let Some(value) = line.strip_prefix("# Expect-error: ") {
            header.expected_error = value.split(" (").next();
        } else if line.starts_with("# Experimental: ") {
            header.experimental = true;
        }
    }
    header
}

fn director(text: &str, allow_experimental: bool) -> Result<Director, String> {
    let config = EndpointPickerConfig::from_yaml(text).map_err(|error| error.to_string())?;
    let ports = [8001, 8002, 8003];
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new(ports.map(|p| fresh_endpoint(p, 0)))));
    let objectives = ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(allow_experimental);
    Director::from_config(&config, &registry, pool, DirectorOptions::default(), objectives)
        .map_err(|error| error.to_string())
}

/// A vLLM gRPC `GenerateRequest` with the text prompt "Hello", framed.
const GRPC_GENERATE: &[u8] = b"\x00\x00\x00\x00\x07\x1a\x05Hello";

const CHAT: &[u8] = br#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Hello"}]}"#;

/// A Vertex AI `ChatCompletionsRequest` (field 2, `http_body`) whose `HttpBody.data` (field 2)
/// is [`CHAT`], framed.
fn vertex_chat() -> Vec<u8> {
    let mut http_body = vec![0x12, CHAT.len() as u8];
    http_body.extend_from_slice(CHAT);
    let mut message = vec![0x12, http_body.len() as u8];
    message.extend_from_slice(&http_body);
    let mut body = vec![0];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    body
}

/// The requests a config may route, by the first path its parsers claim: a chat completion,
/// a vLLM gRPC generate request, a Vertex AI chat completion.
fn requests() -> [(&'static str, Vec<u8>); 3] {
    [
        ("/v1/chat/completions", CHAT.to_vec()),
        ("/vllm.grpc.engine.VllmEngine/Generate", GRPC_GENERATE.to_vec()),
        ("/google.cloud.aiplatform.v1beta1.PredictionService/ChatCompletions", vertex_chat()),
    ]
}

/// Routes the first of [`requests`] that the config's parsers claim (`which`).
async fn route_one(director: Director, which: usize) -> Decision {
    let (running, mut client) = serve(director).await;
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    let (path, body) = &requests()[which];
    let request = ProxyRequest {
        headers: vec![(":path", path), (":method", "POST")],
        body: body.as_slice(),
        chunk_bytes: 0,
        subset: None,
    };
    stream.send_request(&request).await.unwrap();
    let decision = stream.decision().await.unwrap();
    if matches!(decision, Decision::Routed { .. }) {
        stream.respond(None, &[b"{}"]).await.unwrap();
    }
    drop(stream);
    running.shutdown(std::time::Duration::from_secs(1)).await;
    decision
}

/// The plugin type an error says is unknown.
fn unknown_type(error: &str) -> Option<&str> {
    let (_, rest) = error.split_once("unknown plugin type '")?;
    rest.split_once('\'').map(|(type_name, _)| type_name)
}

/// Which of [`requests`] the config routes: the first its parsers claim.
fn request_for(text: &str) -> usize {
    let config = EndpointPickerConfig::from_yaml(text).unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    let plugins = config.construct_plugins(&registry).unwrap();
    let table = config.parser_table(&plugins).unwrap();
    requests().iter().position(|(path, _)| table.resolve(path).is_some()).unwrap_or(0)
}

#[tokio::test]
async fn every_collected_config_loads_and_routes_unless_pending() {
    let files = corpus();
    assert!(files.len() >= 20, "the corpus is there: {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let Header { source, pending, expected_error, experimental } = header(&text);
        assert!(source.is_some_and(|url| url.contains("/blob/")), "{name}: no # Source: header");
        if experimental {
            match director(&text, false) {
                Err(error) if error.contains("is experimental") => {}
                other => failures.push(format!(
                    "{name}: marked Experimental but not refused as such by default: {:?}",
                    other.err()
                )),
            }
        }
        let loaded = director(&text, experimental);
        if let Some(expected) = expected_error {
            match loaded {
                Err(error) if error.contains(expected) => {}
                other => {
                    failures.push(format!("{name}: expected '{expected}', got {:?}", other.err()))
                }
            }
            continue;
        }
        match (loaded, pending) {
            (Ok(director), None) => match route_one(director, request_for(&text)).await {
                Decision::Routed { destination, .. }
                    if destination.starts_with("127.0.0.1:800") => {}
                other => failures.push(format!("{name}: not routed: {other:?}")),
            },
            (Err(error), None) => failures.push(format!("{name}: refused: {error}")),
            (Ok(_), Some(reason)) => {
                failures.push(format!("{name}: loads now; drop its Pending marker ({reason})"))
            }
            (Err(error), Some(reason)) => match unknown_type(&error) {
                Some(missing) if reason.contains(missing) => {}
                Some(missing) => failures.push(format!(
                    "{name}: pending ({reason}), but refused for '{missing}', which the marker does not name"
                )),
                // Built without the `kv-events` feature, the precise prefix plugins are known
                // types refused with the feature named; the marker names the plugin.
                None if error.contains("--features kv-events")
                    && reason.contains("precise-prefix-cache") => {}
                None => failures
                    .push(format!("{name}: pending, but refused for another reason: {error}")),
            },
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} configs:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
