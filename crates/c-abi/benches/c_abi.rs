//! What the C boundary costs: one decision through `epp_schedule` (plus the
//! `epp_request_complete` that every scheduled request needs) against the same decision made
//! in Rust with `Director::decide` (parse, admission, scheduling) on the same config, options,
//! pool and request; and `Scheduler::schedule` alone on a parsed request, for scale.
//!
//! Run with `cargo bench -p epp-c-abi --bench c_abi`.

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use epp_c_abi::{
    EPP_OUTCOME_COMPLETED, EppEndpointMetrics, EppHeader, EppStatus, epp_endpoint_set_metrics,
    epp_endpoint_upsert, epp_request_complete, epp_schedule, epp_scheduler_free, epp_scheduler_new,
};
use scheduler_core::flow::{FlowMetrics, ObjectiveResolver};
use scheduler_core::{
    Director, DirectorOptions, Endpoint, EndpointMetrics, EndpointPickerConfig, EndpointState,
    InferenceRequest, Outcome, SharedPool,
};

const ENDPOINTS: u8 = 16;
const BODY: &[u8] = br#"{"model":"llama","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarise the plot of Hamlet in two sentences."}]}"#;
const PATH: &str = "/v1/chat/completions";

fn load(index: u8) -> (u32, f64) {
    (u32::from(index % 5), f64::from(index % 7) / 7.0)
}

fn bench(c: &mut Criterion) {
    // GIE's default profile: as text for the C API, and built directly for the Rust director.
    let config = scheduler_core::DEFAULT_CONFIG_YAML;

    // SAFETY: a valid pointer and length; the handle is freed at the end.
    let handle = unsafe { epp_scheduler_new(config.as_ptr().cast(), config.len()) };
    assert!(!handle.is_null());
    let addresses: Vec<std::ffi::CString> = (0..ENDPOINTS)
        .map(|i| std::ffi::CString::new(format!("10.0.0.{i}:8000")).unwrap())
        .collect();
    for (i, address) in addresses.iter().enumerate() {
        let (queue, kv) = load(i as u8);
        let metrics = EppEndpointMetrics {
            waiting_queue: queue,
            running: 2,
            kv_usage: kv,
            max_lora: 0,
            kv_capacity_blocks: 0,
            active_loras: std::ptr::null(),
            waiting_loras: std::ptr::null(),
        };
        // SAFETY: live handle, NUL-terminated address, valid metrics.
        unsafe {
            assert_eq!(epp_endpoint_upsert(handle, address.as_ptr(), std::ptr::null()), 0);
            assert_eq!(epp_endpoint_set_metrics(handle, address.as_ptr(), &metrics), 0);
        }
    }

    let pool = Arc::new(SharedPool::default());
    pool.update(|pool| {
        for i in 0..ENDPOINTS {
            let (waiting_queue, kv_usage) = load(i);
            pool.upsert(
                EndpointState::new(Endpoint::new(([10, 0, 0, i], 8000).into())).with_metrics(
                    EndpointMetrics {
                        waiting_queue,
                        running: 2,
                        kv_usage,
                        updated_at: Some(Instant::now()),
                        ..EndpointMetrics::default()
                    },
                ),
            );
        }
    });
    // The options the C ABI builds its director with.
    let options = DirectorOptions { max_body_bytes: usize::MAX, ..DirectorOptions::default() };
    let objectives = ObjectiveResolver::new(Vec::new(), Arc::new(FlowMetrics::new())).unwrap();
    let director = Director::from_config(
        &EndpointPickerConfig::gie_default(),
        &scorers::builtin_registry(),
        pool,
        options,
        objectives,
    )
    .unwrap();
    let rust_headers = [(":path".to_owned(), PATH.to_owned())];

    let headers = [EppHeader {
        name: ":path".as_ptr().cast(),
        name_len: 5,
        value: PATH.as_ptr().cast(),
        value_len: PATH.len(),
    }];
    let mut group = c.benchmark_group("decision_16_endpoints");
    group.bench_function("c_abi_schedule_and_complete", |b| {
        let mut out = [0 as std::ffi::c_char; 256];
        b.iter(|| {
            let (mut token, mut http) = (0u64, 0i32);
            // SAFETY: live handle; every pointer covers its length.
            let status = unsafe {
                epp_schedule(
                    handle,
                    BODY.as_ptr(),
                    BODY.len(),
                    headers.as_ptr(),
                    headers.len(),
                    out.as_mut_ptr(),
                    out.len(),
                    1,
                    &mut token,
                    &mut http,
                )
            };
            debug_assert_eq!(status, EppStatus::Ok as i32);
            // SAFETY: live handle.
            unsafe { epp_request_complete(handle, black_box(token), 0, 0, EPP_OUTCOME_COMPLETED) }
        });
    });
    group.bench_function("rust_director_decide_and_complete", |b| {
        b.iter(|| {
            // Without the flowControl gate the decision is ready on its first poll, as in C.
            let decision = pin!(director.decide(&rust_headers, black_box(BODY), None));
            let Poll::Ready(routed) = decision.poll(&mut Context::from_waker(Waker::noop())) else {
                unreachable!("no queue without the flowControl gate");
            };
            let routed = routed.unwrap();
            if let Some(guard) = routed.completion {
                guard.finish(Outcome::Completed);
            }
            routed.primary
        });
    });
    let request = InferenceRequest::from_openai(Some(PATH), [(":path", PATH)], BODY).unwrap();
    let snapshot = director.pool().load();
    group.bench_function("rust_schedule_only", |b| {
        b.iter(|| {
            director.scheduler().schedule(black_box(&request), &snapshot).unwrap().primary().id()
        });
    });
    group.finish();

    // SAFETY: the handle is not used again.
    unsafe { epp_scheduler_free(handle) };
}

criterion_group!(benches, bench);
criterion_main!(benches);
