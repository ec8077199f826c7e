//! The precise policy: llm-d's `precise-prefix-cache-producer` fed by the simulated servers'
//! KV-cache events, with a configurable delay and loss.

use sim::{
    KvEventLink, Policy, RunReport, ServerProfile, SimConfig, SyntheticWorkload, WorkloadSource,
    WorkloadSpec,
};

fn run(policy: &Policy, kv_events: KvEventLink) -> RunReport {
    let config = SimConfig { kv_events, ..SimConfig::new(10, ServerProfile::h100_llama3_8b()) };
    let source = WorkloadSource::Synthetic(SyntheticWorkload::prefix_heavy());
    let workload = WorkloadSpec::new("prefix-heavy", source, 100.0, 2000);
    sim::run(&config, &workload, policy).unwrap()
}

const PROMPT: KvEventLink = KvEventLink { delay_s: 0.005, loss: 0.0 };
const NEVER: KvEventLink = KvEventLink { delay_s: 1e9, loss: 0.0 };

#[test]
fn the_events_are_what_the_precise_policy_routes_on() {
    let precise = Policy::parse("epp-precise").unwrap();
    let informed = run(&precise, PROMPT);
    let blind = run(&precise, NEVER);
    assert!(
        informed.prefix_hit_rate > blind.prefix_hit_rate + 0.2,
        "with events {:.3}, without {:.3}",
        informed.prefix_hit_rate,
        blind.prefix_hit_rate
    );
    assert!(informed.ttft_s.p90 < blind.ttft_s.p90);
}

#[test]
fn speculative_indexing_covers_picks_the_events_have_not_confirmed() {
    let speculative = Policy::parse("epp-precise-speculative").unwrap();
    let precise = Policy::parse("epp-precise").unwrap();
    // With no event ever arriving, only the picks themselves can keep a prefix together.
    let guessing = run(&speculative, NEVER);
    let blind = run(&precise, NEVER);
    assert!(
        guessing.prefix_hit_rate > blind.prefix_hit_rate + 0.2,
        "speculative {:.3}, plain {:.3}",
        guessing.prefix_hit_rate,
        blind.prefix_hit_rate
    );
    // With events, speculation loses nothing.
    let both = run(&speculative, PROMPT);
    let events_only = run(&precise, PROMPT);
    assert!(both.prefix_hit_rate >= events_only.prefix_hit_rate - 0.005);
}

#[test]
fn lost_events_fall_back_to_the_approximate_index() {
    let precise = Policy::parse("epp-precise").unwrap();
    let lossy = run(&precise, KvEventLink { delay_s: 0.005, loss: 0.05 });
    let blind = run(&precise, NEVER);
    // Servers whose stream had a gap are matched on where prompts were sent, not on nothing.
    assert!(
        lossy.prefix_hit_rate > blind.prefix_hit_rate + 0.2,
        "lossy {:.3}, blind {:.3}",
        lossy.prefix_hit_rate,
        blind.prefix_hit_rate
    );
    // And the run repeats exactly: losses are drawn from the seed.
    assert_eq!(lossy, run(&precise, KvEventLink { delay_s: 0.005, loss: 0.05 }));
}

#[test]
fn impossible_links_are_refused() {
    let precise = Policy::parse("epp-precise").unwrap();
    let source = WorkloadSource::Synthetic(SyntheticWorkload::prefix_heavy());
    let workload = WorkloadSpec::new("prefix-heavy", source, 10.0, 10);
    for kv_events in [
        KvEventLink { delay_s: -1.0, loss: 0.0 },
        KvEventLink { delay_s: f64::INFINITY, loss: 0.0 },
        KvEventLink { delay_s: 0.0, loss: 1.5 },
        KvEventLink { delay_s: 0.0, loss: f64::NAN },
    ] {
        let config = SimConfig { kv_events, ..SimConfig::new(2, ServerProfile::small_test()) };
        let error = sim::run(&config, &workload, &precise).unwrap_err();
        assert!(error.to_string().contains("KV events"), "{error}");
    }
}
