//! Embedding the scheduler: build it from an EndpointPickerConfig YAML, publish a pool
//! snapshot, schedule an OpenAI chat request, and print the pick with every scorer's scores.
//!
//! Run with `cargo run --example embed`.

use std::error::Error;
use std::time::Instant;

use epp_rs::core::{
    Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot,
    ScheduleOptions, SharedPool,
};

const CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: lora-affinity-scorer
- type: max-score-picker
  parameters:
    maxNumOfEndpoints: 2
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: lora-affinity-scorer
  - pluginRef: max-score-picker
";

const BODY: &[u8] = br#"{
  "model": "sql-lora",
  "messages": [
    {"role": "system", "content": "You translate questions into SQL."},
    {"role": "user", "content": "How many orders shipped last week?"}
  ]
}"#;

fn main() -> Result<(), Box<dyn Error>> {
    let scheduler =
        EndpointPickerConfig::from_yaml(CONFIG)?.build(&epp_rs::scorers::builtin_registry())?;

    // The metrics collector would publish these; here three replicas are described by hand.
    let pool = SharedPool::default();
    let replica = |name: &str, address: &str, queue: u32, kv: f64, adapters: &[&str]| {
        Ok::<_, Box<dyn Error>>(
            EndpointState::new(Endpoint::new(address.parse()?).with_name(name)).with_metrics(
                EndpointMetrics {
                    waiting_queue: queue,
                    running: 4,
                    kv_usage: kv,
                    active_lora_adapters: adapters.iter().map(|&a| a.into()).collect(),
                    max_lora_adapters: 2,
                    updated_at: Some(Instant::now()),
                    ..EndpointMetrics::default()
                },
            ),
        )
    };
    pool.publish(PoolSnapshot::new([
        replica("vllm-0", "10.0.0.10:8000", 6, 0.70, &["sql-lora"])?,
        replica("vllm-1", "10.0.0.11:8000", 0, 0.20, &[])?,
        replica("vllm-2", "10.0.0.12:8000", 2, 0.35, &["sql-lora", "chat-lora"])?,
    ]));

    let request = InferenceRequest::from_openai(
        Some("/v1/chat/completions"),
        [("x-request-id", "demo-1")],
        BODY,
    )?;
    let snapshot = pool.load();
    let result = scheduler.schedule_with(
        &request,
        &snapshot,
        ScheduleOptions { explain: true, ..ScheduleOptions::default() },
    )?;

    println!("request {} for model '{}'", request.request_id, request.target_model);
    for explanation in result.explanation().unwrap_or_default() {
        println!("profile '{}':", explanation.profile);
        print!("  {:<10}", "endpoint");
        for (name, weight, _) in &explanation.scorers {
            print!(" {:>30}", format!("{name} (x{weight})"));
        }
        println!(" {:>8}", "total");
        for (row, &index) in explanation.candidates.iter().enumerate() {
            let endpoint = &snapshot.endpoints()[index as usize].endpoint;
            print!("  {:<10}", &*endpoint.name);
            for (_, _, scores) in &explanation.scorers {
                print!(" {:>30.3}", scores[row]);
            }
            println!(" {:>8.3}", explanation.totals[row]);
        }
    }
    let primary = &result.primary().endpoint;
    println!("picked {} ({})", primary.name, primary.address);
    let fallbacks: Vec<String> =
        result.fallbacks().map(|e| e.endpoint.address.to_string()).collect();
    println!("fallbacks: {}", fallbacks.join(","));
    Ok(())
}
