//! Real `EndpointPickerConfig` files, collected from llm-d-router and GIE at several versions
//! (`tests/data/configs/`, each with its source and commit in a header comment), each loaded
//! unchanged by the real server, which then routes a request.
//!
//! A file may say `# Pending: <why>` in its header when it needs a plugin not built yet (with
//! the issue that builds it, when there is one); it must then be refused with an error that
//! names the unknown plugin or key, and the marker goes once the plugin lands. A file the Go
//! loader refuses too (a typo in a guide) says `# Expect-error: <text>`, and the error must
//! contain that text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::server::{self, ServerConfig};
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState,
    PoolSnapshot, SharedPool,
};

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
        }
    }
    header
}

fn director(text: &str) -> Result<Director, String> {
    let config = EndpointPickerConfig::from_yaml(text).map_err(|error| error.to_string())?;
    let endpoint = |port: u16| {
        EndpointState::new(Endpoint::new(([127, 0, 0, 1], port).into())).with_metrics(
            EndpointMetrics {
                updated_at: Some(std::time::Instant::now()),
                ..EndpointMetrics::default()
            },
        )
    };
    let pool = Arc::new(SharedPool::new(PoolSnapshot::new([8001, 8002, 8003].map(endpoint))));
    let objectives = ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap();
    // As the Go EPP run with --allow-experimental-plugins: alpha plugins load too.
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    Director::from_config(&config, &registry, pool, DirectorOptions::default(), objectives)
        .map_err(|error| error.to_string())
}

async fn route_one(director: Director) -> Decision {
    let config = ServerConfig { staleness_threshold: None, ..ServerConfig::loopback("corpus") };
    let running = server::start_with_director(Arc::new(director), config).await.unwrap();
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    let mut stream = ProxyStream::open(&mut client).await.unwrap();
    let body = br#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Hello"}]}"#;
    let request = ProxyRequest {
        headers: vec![(":path", "/v1/chat/completions"), (":method", "POST")],
        body,
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

#[tokio::test]
async fn every_collected_config_loads_and_routes_unless_pending() {
    let files = corpus();
    assert!(files.len() >= 20, "the corpus is there: {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let Header { source, pending, expected_error } = header(&text);
        assert!(source.is_some_and(|url| url.contains("/blob/")), "{name}: no # Source: header");
        let loaded = director(&text);
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
            (Ok(director), None) => match route_one(director).await {
                Decision::Routed { destination, .. }
                    if destination.starts_with("127.0.0.1:800") => {}
                other => failures.push(format!("{name}: not routed: {other:?}")),
            },
            (Err(error), None) => failures.push(format!("{name}: refused: {error}")),
            (Ok(_), Some(reason)) => {
                failures.push(format!("{name}: loads now; drop its Pending marker ({reason})"))
            }
            (Err(error), Some(_)) => {
                if !error.contains("unknown") {
                    failures
                        .push(format!("{name}: pending, but refused for another reason: {error}"));
                }
            }
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
