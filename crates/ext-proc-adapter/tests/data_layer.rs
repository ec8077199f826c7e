//! The config's `dataLayer` runs the server: the metrics source's path and the extractor's
//! custom metric names decide what is scraped, `file-discovery` names the endpoints, and the
//! scraped values drive routing.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use demo::ext_proc_client::{Decision, ProxyRequest, ProxyStream};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use ext_proc_adapter::data_layer::{self, DataLayerError};
use ext_proc_adapter::server::{self, CollectorSettings, ServerConfig};
use metrics_model::collector::CollectorConfig;
use metrics_model::mapping::Engine;
use scheduler_core::{EndpointId, EndpointPickerConfig, SharedPool};
use support::tempdir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::PrivatePkcs8KeyDer;

/// A model-server stand-in answering `GET path` with its page for each path it knows, and
/// 404 for any other.
async fn model_server(pages: HashMap<&'static str, String>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let pages = Arc::new(pages);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let pages = Arc::clone(&pages);
            tokio::spawn(respond(socket, pages));
        }
    });
    address
}

/// Answers the HTTP/1.1 requests on one connection, plain or TLS, from `pages`.
async fn respond<S>(mut socket: S, pages: Arc<HashMap<&'static str, String>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 4096];
    loop {
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        let head = String::from_utf8_lossy(&seen);
        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        let response = match pages.get(path.as_str()) {
            Some(page) => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{page}",
                page.len()
            ),
            None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned(),
        };
        if socket.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A vLLM stand-in serving `page` at `/metrics` over TLS only, with a self-signed certificate
/// for 127.0.0.1 whose PEM it returns.
async fn tls_model_server(page: String) -> (SocketAddr, String) {
    tls_server(HashMap::from([("/metrics", page)])).await
}

/// A server answering `pages` over TLS only, with a self-signed certificate for 127.0.0.1
/// whose PEM it returns.
async fn tls_server(pages: HashMap<&'static str, String>) -> (SocketAddr, String) {
    tls_server_named("127.0.0.1", pages).await
}

/// A server answering `pages` over TLS only, with a self-signed certificate for `name` (an
/// IP or a DNS name) whose PEM it returns.
async fn tls_server_named(
    name: &str,
    pages: HashMap<&'static str, String>,
) -> (SocketAddr, String) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key.into())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let pages = Arc::new(pages);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let pages = Arc::clone(&pages);
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(socket).await {
                    respond(stream, pages).await;
                }
            });
        }
    });
    (address, certified.cert.pem())
}

/// A server whose custom page at `/custom/stats` reports `queue` waiting and `kv` usage, and
/// whose vLLM page at `/metrics` reports the opposite load: routing by the wrong page picks
/// the other server.
async fn stand_in(queue: u32, kv: f64, vllm_queue: u32) -> SocketAddr {
    let custom = format!(
        "# TYPE my_queue gauge\nmy_queue{{tier=\"gold\"}} {queue}\nmy_queue{{tier=\"free\"}} 1000\n\
         my_running 1\nmy_kv {kv}\n"
    );
    let vllm = format!(
        "vllm:num_requests_waiting {vllm_queue}\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 0\n"
    );
    let models = format!(
        r#"{{"object":"list","data":[{{"id":"base","parent":null}},{{"id":"lora-{queue}","parent":"base"}}]}}"#
    );
    model_server(HashMap::from([
        ("/custom/stats", custom),
        ("/metrics", vllm),
        ("/models", models),
    ]))
    .await
}

fn config_yaml(endpoints_file: &std::path::Path) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
- name: scrape
  type: metrics-data-source
  parameters: {{scheme: http, path: /custom/stats, interval: 20ms}}
- name: extract
  type: core-metrics-extractor
  parameters:
    defaultEngine: custom-engine
    engineConfigs:
    - name: custom-engine
      queuedRequestsSpec: my_queue{{tier=gold}}
      runningRequestsSpec: my_running
      kvUsageSpec: my_kv
- type: models-data-source
  parameters: {{path: /models, interval: 20ms}}
- type: models-data-extractor
- name: files
  type: file-discovery
  parameters: {{path: {}, watchFile: true}}
dataLayer:
  injectDefaults: false
  sources:
  - pluginRef: scrape
    extractors: [{{pluginRef: extract}}]
  - pluginRef: models-data-source
    extractors: [{{pluginRef: models-data-extractor}}]
  discovery: {{pluginRef: files}}
",
        endpoints_file.display()
    )
}

async fn route_once(client: &mut ExternalProcessorClient<tonic::transport::Channel>) -> String {
    let mut stream = ProxyStream::open(client).await.unwrap();
    stream
        .send_request(&ProxyRequest {
            headers: vec![(":path", "/v1/completions")],
            body: br#"{"model":"m","prompt":"hello"}"#,
            chunk_bytes: 0,
            subset: None,
        })
        .await
        .unwrap();
    match stream.decision().await.unwrap() {
        Decision::Routed { destination, .. } => destination,
        other => panic!("not routed: {other:?}"),
    }
}

#[tokio::test]
async fn the_data_layer_decides_what_is_scraped_and_scraped_values_drive_routing() {
    let busy = stand_in(9, 0.9, 0).await;
    let idle = stand_in(0, 0.05, 50).await;
    let dir = tempdir();
    let file = dir.join("pool.yaml");
    std::fs::write(
        &file,
        format!(
            "- {{address: 127.0.0.1, port: {}}}\n- {{address: 127.0.0.1, port: {}}}\n",
            busy.port(),
            idle.port()
        ),
    )
    .unwrap();
    let config = EndpointPickerConfig::from_yaml(&config_yaml(&file)).unwrap();
    let registry = scorers::builtin_registry();
    // The implied default profile holds the scorers and the picker, not the data layer.
    let scheduler = config.build(&registry).unwrap();
    let plugins = config.construct_plugins(&registry).unwrap();
    let layer = config.data_layer(&plugins, &registry).unwrap();

    // As the binary builds it from flags: vLLM names at /metrics, no endpoints file.
    let mut server_config = ServerConfig {
        collector: Some(CollectorSettings {
            config: CollectorConfig {
                interval: Duration::from_secs(1),
                staleness_threshold: Duration::from_secs(2),
                ..CollectorConfig::default()
            },
            default_engine: Engine::Vllm,
            engines: None,
        }),
        staleness_threshold: Some(Duration::from_secs(2)),
        ..ServerConfig::loopback("data-layer-pool")
    };
    data_layer::apply(&layer, &mut server_config).unwrap();
    let collector = server_config.collector.as_ref().unwrap();
    assert_eq!(collector.config.metrics_path, "/custom/stats");
    assert_eq!(collector.config.interval, Duration::from_millis(20), "the source's interval");
    assert_eq!(server_config.endpoints_file.as_deref(), Some(file.as_path()));

    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = pool.load();
        let metrics = |address| {
            snapshot.by_id(EndpointId::from_address(address)).map(|state| state.metrics.clone())
        };
        if let (Some(busy), Some(idle)) = (metrics(busy), metrics(idle))
            && busy.updated_at.is_some()
            && idle.updated_at.is_some()
        {
            // The gold series only, from the custom page.
            assert_eq!((busy.waiting_queue, busy.running, busy.kv_usage), (9, 1, 0.9));
            assert_eq!((idle.waiting_queue, idle.kv_usage), (0, 0.05));
            break;
        }
        assert!(Instant::now() < deadline, "custom metrics never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    for _ in 0..5 {
        assert_eq!(route_once(&mut client).await, idle.to_string());
    }

    // The models source: each endpoint's model list, adapters with their base.
    let models = running.endpoint_models.clone().expect("models-data-source is polled");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(models.serves(EndpointId::from_address(busy), "lora-9")
        && models.serves(EndpointId::from_address(idle), "lora-0"))
    {
        assert!(Instant::now() < deadline, "model lists never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = models.get(EndpointId::from_address(idle)).unwrap();
    assert_eq!(served[1].parent.as_deref(), Some("base"));
    assert!(!models.serves(EndpointId::from_address(idle), "lora-9"));
    running.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn without_a_section_the_command_line_stays_in_charge() {
    let config = EndpointPickerConfig::gie_default();
    let registry = scorers::builtin_registry();
    let plugins = config.construct_plugins(&registry).unwrap();
    let layer = config.data_layer(&plugins, &registry).unwrap();
    assert!(!layer.declared);
    let mut server_config =
        ServerConfig { endpoints_file: Some("flag.yaml".into()), ..ServerConfig::loopback("p") };
    data_layer::apply(&layer, &mut server_config).unwrap();
    assert_eq!(server_config.endpoints_file.as_deref(), Some(std::path::Path::new("flag.yaml")));
    assert!(server_config.collector.is_none());
}

#[test]
fn bad_tls_files_and_two_discoveries_are_refused_by_name() {
    let registry = scorers::builtin_registry();
    let layer_of = |yaml: &str| {
        let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        config.data_layer(&plugins, &registry).unwrap()
    };
    // https itself is accepted; an unreadable CA file stops the start, naming the file.
    let https = layer_of(
        "plugins:\n- type: metrics-data-source\n  parameters: {scheme: https}\ndataLayer: {}\n",
    );
    let mut config = ServerConfig::loopback("p");
    data_layer::apply(&https, &mut config).unwrap();
    let tls = config.collector.as_ref().and_then(|collector| collector.config.tls.as_ref());
    assert!(tls.unwrap().settings().insecure_skip_verify, "insecureSkipVerify defaults to true");
    let bad_ca = layer_of(
        "plugins:\n- type: metrics-data-source\n  parameters: {scheme: https, \
         insecureSkipVerify: false, caCertPath: /nonexistent/ca.pem}\ndataLayer: {}\n",
    );
    let error = data_layer::apply(&bad_ca, &mut ServerConfig::loopback("p")).unwrap_err();
    assert!(
        matches!(&error, DataLayerError::Tls { source_name, .. } if source_name == "metrics-data-source")
    );
    let message = error.to_string();
    assert!(message.contains("caCertPath /nonexistent/ca.pem"), "{message}");

    let files = layer_of(
        "plugins:\n- type: file-discovery\n  parameters: {path: /e.yaml}\n\
         dataLayer: {discovery: {pluginRef: file-discovery}}\n",
    );
    let mut flags =
        ServerConfig { endpoints_file: Some("flag.yaml".into()), ..ServerConfig::loopback("p") };
    let error = data_layer::apply(&files, &mut flags).unwrap_err();
    assert!(error.to_string().contains("'file-discovery'"), "{error}");
    let mut config = ServerConfig::loopback("p");
    data_layer::apply(&files, &mut config).unwrap();
    assert!(!config.watch_endpoints_file, "watchFile defaults to false, as in Go");
}

/// In a fresh directory: the CA file `cert_pem` and an endpoints file listing `address`.
fn ca_and_pool_files(cert_pem: &str, address: SocketAddr) -> (PathBuf, PathBuf) {
    let dir = tempdir();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert_pem).unwrap();
    let endpoints = dir.join("pool.yaml");
    std::fs::write(&endpoints, format!("- {{address: 127.0.0.1, port: {}}}\n", address.port()))
        .unwrap();
    (ca, endpoints)
}

#[tokio::test]
async fn an_https_metrics_source_scrapes_a_tls_server_verified_by_its_ca_file() {
    let (address, cert_pem) = tls_model_server(
        "vllm:num_requests_waiting 4\nvllm:num_requests_running 3\nvllm:kv_cache_usage_perc 0.5\n"
            .to_owned(),
    )
    .await;
    let (ca, endpoints) = ca_and_pool_files(&cert_pem, address);
    let yaml = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
- name: scrape
  type: metrics-data-source
  parameters: {{scheme: https, insecureSkipVerify: false, caCertPath: {}, interval: 20ms}}
- name: extract
  type: core-metrics-extractor
- name: files
  type: file-discovery
  parameters: {{path: {}}}
dataLayer:
  injectDefaults: false
  sources:
  - pluginRef: scrape
    extractors: [{{pluginRef: extract}}]
  discovery: {{pluginRef: files}}
",
        ca.display(),
        endpoints.display()
    );
    let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
    let registry = scorers::builtin_registry();
    let scheduler = config.build(&registry).unwrap();
    let plugins = config.construct_plugins(&registry).unwrap();
    let layer = config.data_layer(&plugins, &registry).unwrap();
    let mut server_config = ServerConfig {
        staleness_threshold: Some(Duration::from_secs(2)),
        ..ServerConfig::loopback("https-pool")
    };
    data_layer::apply(&layer, &mut server_config).unwrap();

    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics =
            pool.load().by_id(EndpointId::from_address(address)).map(|state| state.metrics.clone());
        if let Some(metrics) = metrics
            && metrics.updated_at.is_some()
        {
            assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (4, 3, 0.5));
            break;
        }
        assert!(Instant::now() < deadline, "metrics never arrived over https");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;
}

/// Waits up to ten seconds for `probe` to give a value.
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resolved data layer of `yaml`, alpha plugins allowed.
fn experimental_layer(
    yaml: &str,
) -> (scheduler_core::Scheduler, scheduler_core::data_layer::ResolvedDataLayer) {
    let config = EndpointPickerConfig::from_yaml(yaml).unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    // One construction for both, as the epp binary does: the data layer feeds the instances
    // the scheduler reads.
    let plugins = config.construct_plugins(&registry).unwrap();
    let scheduler = config.build_with(&plugins, &registry).unwrap();
    let layer = config.data_layer(&plugins, &registry).unwrap();
    (scheduler, layer)
}

#[tokio::test]
async fn an_https_models_source_polls_a_tls_server_verified_by_its_ca_file() {
    let models = r#"{"object":"list","data":[{"id":"base"},{"id":"sql-lora","parent":"base"}]}"#;
    let (address, cert_pem) = tls_server(HashMap::from([("/v1/models", models.to_owned())])).await;
    let (ca, endpoints) = ca_and_pool_files(&cert_pem, address);
    let yaml = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: max-score-picker
- name: models
  type: models-data-source
  parameters: {{scheme: https, insecureSkipVerify: false, caCertPath: {}, interval: 20ms}}
- type: models-data-extractor
- name: files
  type: file-discovery
  parameters: {{path: {}}}
dataLayer:
  injectDefaults: false
  sources:
  - pluginRef: models
    extractors: [{{pluginRef: models-data-extractor}}]
  discovery: {{pluginRef: files}}
",
        ca.display(),
        endpoints.display()
    );
    let (scheduler, layer) = experimental_layer(&yaml);
    let mut server_config = ServerConfig::loopback("models-pool");
    data_layer::apply(&layer, &mut server_config).unwrap();
    assert!(server_config.models.as_ref().is_some_and(|models| models.tls.is_some()));
    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();
    let store = running.endpoint_models.clone().expect("models are polled");
    let id = EndpointId::from_address(address);
    let served = eventually("the model list over https", || store.get(id)).await;
    assert_eq!(served.len(), 2);
    assert!(store.serves(id, "sql-lora"));
    running.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_dcgm_source_scrapes_each_endpoints_exporter_for_gpu_utilization() {
    // A node-level exporter page: GPUs of two pods, the busiest of vllm-0's at 80%.
    let page = "\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-a\",Hostname=\"node\",pod=\"vllm-0\",namespace=\"ns\"} 35
DCGM_FI_DEV_GPU_UTIL{gpu=\"1\",UUID=\"GPU-b\",Hostname=\"node\",pod=\"vllm-0\",namespace=\"ns\"} 80
DCGM_FI_DEV_GPU_UTIL{gpu=\"2\",UUID=\"GPU-c\",Hostname=\"node\",pod=\"vllm-1\",namespace=\"ns\"} 99
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu=\"0\",UUID=\"GPU-a\"} 20480
";
    let exporter = model_server(HashMap::from([("/dcgm", page.to_owned())])).await;
    let vllm = stand_in(0, 0.0, 0).await;
    // Less loaded by its metrics, but its GPU is at 99%.
    let busy_gpu = stand_in(0, 0.0, 0).await;
    let dir = tempdir();
    let endpoints = dir.join("pool.yaml");
    std::fs::write(
        &endpoints,
        format!(
            "- {{address: 127.0.0.1, port: {}, name: vllm-0}}\n- {{address: 127.0.0.1, port: {}, name: vllm-1}}\n",
            vllm.port(),
            busy_gpu.port()
        ),
    )
    .unwrap();
    let yaml = format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: max-score-picker
- type: dcgm-data-source
  name: dcgm-source
  parameters: {{port: {}, path: /dcgm, interval: 20ms}}
- type: dcgm-extractor
  name: dcgm-extractor
- type: endpoint-attribute-filter
  name: gpu-utilization-filter
  parameters:
    attribute: GPUUtilization
    producer: dcgm-extractor
    onMissing: Fail
    algorithm: {{type: threshold, threshold: {{operator: LessThanOrEqual, value: 0.9}}}}
- name: files
  type: file-discovery
  parameters: {{path: {}}}
dataLayer:
  sources:
  - pluginRef: dcgm-source
    extractors:
    - pluginRef: dcgm-extractor
  discovery: {{pluginRef: files}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: gpu-utilization-filter
  - pluginRef: max-score-picker
",
        exporter.port(),
        endpoints.display()
    );
    let (scheduler, layer) = experimental_layer(&yaml);
    let mut server_config = ServerConfig::loopback("gpu-pool");
    data_layer::apply(&layer, &mut server_config).unwrap();
    let gpu = server_config.gpu.as_ref().expect("the exporter is scraped");
    assert_eq!(
        (gpu.port, gpu.path.as_str(), gpu.interval),
        (Some(exporter.port()), "/dcgm", Duration::from_millis(20))
    );
    assert!(server_config.collector.is_some(), "the metrics source is still injected");
    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();
    let store = running.endpoint_gpu_utilization.clone().expect("GPU utilization is scraped");
    let id = EndpointId::from_address(vllm);
    let read = eventually("GPU utilization", || store.get(id)).await;
    assert_eq!(read.value, 0.8, "the busiest of the pod's own GPUs, scaled to [0, 1]");
    eventually("both endpoints' utilization", || (store.len() == 2).then_some(())).await;
    // The filter reads the published utilization: the endpoint whose GPU is at 99% is left
    // out, though the picker would otherwise break the tie at random.
    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    for _ in 0..10 {
        assert_eq!(route_once(&mut client).await, vllm.to_string());
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn a_dcgm_source_on_the_node_address_is_refused_by_name() {
    let (_, layer) = experimental_layer(
        "plugins:
- {type: dcgm-data-source, name: node-dcgm, parameters: {useNodeAddress: true}}
- {type: dcgm-extractor}
dataLayer:
  sources: [{pluginRef: node-dcgm, extractors: [{pluginRef: dcgm-extractor}]}]
",
    );
    let error = data_layer::apply(&layer, &mut ServerConfig::loopback("p")).unwrap_err();
    assert!(
        matches!(&error, DataLayerError::NodeAddress { source_name } if source_name == "node-dcgm")
    );
    assert!(error.to_string().contains("useNodeAddress"), "{error}");
}

#[tokio::test]
async fn the_gie_v14_extractor_picks_the_engine_whose_metrics_are_scraped() {
    // The page speaks SGLang; only the v1.4 extractor's `defaultEngine: sglang` reads it.
    let sglang = model_server(HashMap::from([(
        "/metrics",
        "sglang:num_queue_reqs 6\nsglang:num_running_reqs 2\nsglang:token_usage 0.75\n".to_owned(),
    )]))
    .await;
    let dir = tempdir();
    let endpoints = dir.join("pool.yaml");
    std::fs::write(&endpoints, format!("- {{address: 127.0.0.1, port: {}}}\n", sglang.port()))
        .unwrap();
    let (scheduler, layer) = experimental_layer(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates:
- dataLayer
plugins:
- name: model-server-protocol-metrics
  type: model-server-protocol-metrics
  parameters:
    defaultEngine: sglang
",
    );
    let mut server_config = ServerConfig {
        endpoints_file: Some(endpoints),
        collector: Some(CollectorSettings {
            config: CollectorConfig {
                interval: Duration::from_millis(20),
                ..CollectorConfig::default()
            },
            default_engine: Engine::Vllm,
            engines: None,
        }),
        ..ServerConfig::loopback("v14-pool")
    };
    data_layer::apply(&layer, &mut server_config).unwrap();
    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();
    let id = EndpointId::from_address(sglang);
    let metrics = eventually("SGLang metrics", || {
        pool.load().by_id(id).map(|state| state.metrics.clone()).filter(|m| m.updated_at.is_some())
    })
    .await;
    assert_eq!((metrics.waiting_queue, metrics.running, metrics.kv_usage), (6, 2, 0.75));
    running.shutdown(Duration::from_secs(1)).await;
}

/// A peer cluster's EPP metrics page with its pool averages.
fn peer_page(kv_cache: f64, queue: f64) -> HashMap<&'static str, String> {
    let page = format!(
        "# TYPE llm_d_epp_average_kv_cache_utilization gauge\n\
         llm_d_epp_average_kv_cache_utilization{{name=\"pool\"}} {kv_cache}\n\
         # TYPE llm_d_epp_average_queue_size gauge\n\
         llm_d_epp_average_queue_size{{name=\"pool\"}} {queue}\n"
    );
    HashMap::from([("/metrics", page)])
}

#[tokio::test]
async fn peer_clusters_are_scored_by_the_pool_averages_their_epps_publish() {
    // Cluster A is reached as "localhost" and publishes its metrics apart from its gateway
    // (the metricsAddress/metricsPort labels), under a certificate for that DNS name; cluster
    // B serves its metrics on its gateway address, under a certificate for its IP. A is the
    // less loaded, so routing to it shows its page was read through the labels.
    let gateway_a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_a = gateway_a.local_addr().unwrap();
    let (metrics_a, cert_a) = tls_server_named("localhost", peer_page(0.1, 1.0)).await;
    let (gateway_b, cert_b) = tls_server_named("127.0.0.1", peer_page(0.8, 9.0)).await;
    let dir = tempdir();
    let ca = dir.join("peers-ca.pem");
    std::fs::write(&ca, format!("{cert_a}{cert_b}")).unwrap();
    let clusters = dir.join("clusters.yaml");
    std::fs::write(
        &clusters,
        format!(
            "endpoints:
  - name: cluster-a
    address: localhost
    port: \"{}\"
    labels: {{metricsAddress: localhost, metricsPort: \"{}\"}}
  - name: cluster-b
    address: \"127.0.0.1\"
    port: \"{}\"
",
            gateway_a.port(),
            metrics_a.port(),
            gateway_b.port()
        ),
    )
    .unwrap();
    let yaml = format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: multicluster-file-discovery
    name: discovery
    parameters: {{path: {}}}
  - type: multicluster-metrics-data-source
    name: metrics-source
    parameters: {{caCertPath: {}, interval: 20ms}}
  - type: multicluster-metrics-extractor
    name: metrics-extractor
  - type: multicluster-session-affinity-filter
    name: session-affinity
  - type: multicluster-kv-cache-utilization-scorer
    name: kv-cache
  - type: multicluster-queue-scorer
    name: queue
  - type: max-score-picker
  - type: single-profile-handler
dataLayer:
  discovery:
    pluginRef: discovery
  sources:
    - pluginRef: metrics-source
      extractors:
        - pluginRef: metrics-extractor
",
        clusters.display(),
        ca.display()
    );
    let (scheduler, layer) = experimental_layer(&yaml);
    let mut server_config = ServerConfig {
        staleness_threshold: Some(Duration::from_secs(2)),
        ..ServerConfig::loopback("clusters")
    };
    data_layer::apply(&layer, &mut server_config).unwrap();
    assert!(server_config.collector.is_none(), "no pod metrics source is injected for peers");
    assert_eq!(server_config.staleness_threshold, None);
    let peers = server_config.cluster_metrics.as_ref().expect("the peers are scraped");
    assert!(peers.tls.is_some(), "https is the multi-cluster source's default");
    let published = Arc::clone(&peers.publish_to);
    let pool = Arc::new(SharedPool::default());
    let running =
        server::start(Arc::new(scheduler), Arc::clone(&pool), server_config).await.unwrap();

    let cluster_a = EndpointId::from_address(gateway_a);
    let cluster_b = EndpointId::from_address(gateway_b);
    let kv = "llm-d.ai/multicluster-kv-cache-utilization";
    let queue = "llm-d.ai/multicluster-queue-size";
    eventually("both clusters' averages", || {
        let read = |attribute, id| published.value(attribute, id);
        (read(kv, cluster_a).is_some()
            && read(queue, cluster_a).is_some()
            && read(kv, cluster_b).is_some()
            && read(queue, cluster_b).is_some())
        .then_some(())
    })
    .await;
    assert_eq!(published.value(kv, cluster_a), Some(0.1));
    assert_eq!(published.value(queue, cluster_a), Some(1.0));
    assert_eq!(published.value(kv, cluster_b), Some(0.8));
    assert_eq!(published.value(queue, cluster_b), Some(9.0));
    let named_a = pool.load().by_id(cluster_a).map(|state| state.endpoint.clone()).unwrap();
    assert_eq!(&*named_a.name, "cluster-a");
    assert_eq!(named_a.host.as_deref(), Some("localhost"));

    let mut client =
        ExternalProcessorClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    for _ in 0..5 {
        assert_eq!(route_once(&mut client).await, gateway_a.to_string());
    }
    running.shutdown(Duration::from_secs(1)).await;
}

#[test]
fn multi_cluster_scorers_without_the_extractor_are_refused_by_name() {
    let config = EndpointPickerConfig::from_yaml(
        "plugins:
- {type: multicluster-metrics-data-source, name: metrics-source}
- {type: multicluster-queue-scorer, name: queue}
- {type: max-score-picker}
dataLayer:
  sources:
  - pluginRef: metrics-source
",
    )
    .unwrap();
    let mut registry = scorers::builtin_registry();
    registry.allow_experimental_plugins(true);
    let error = config.construct_plugins(&registry).unwrap_err().to_string();
    assert!(error.contains("multicluster-metrics-extractor"), "{error}");
    assert!(error.contains("llm-d.ai/multicluster-queue-size"), "{error}");
}

#[test]
fn a_bad_peer_metric_spec_is_refused_by_name() {
    let (_, layer) = experimental_layer(
        "plugins:
- {type: multicluster-metrics-data-source, name: peers, parameters: {insecureSkipVerify: true}}
- {type: multicluster-metrics-extractor, name: averages, parameters: {queueSizeMetric: \"q{tier=\"}}
- {type: max-score-picker}
dataLayer:
  sources:
  - pluginRef: peers
    extractors: [{pluginRef: averages}]
",
    );
    let mut server_config = ServerConfig::loopback("peers");
    let error = data_layer::apply(&layer, &mut server_config).unwrap_err().to_string();
    assert!(error.starts_with("extractor 'averages': queueSizeMetric:"), "{error}");
}
