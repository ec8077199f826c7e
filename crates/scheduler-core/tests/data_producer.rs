//! Data producers run once per decision, before any profile, and the decision's filters read
//! what they left in the cycle state.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use scheduler_core::{
    Candidates, CycleState, DataProducer, Endpoint, EndpointState, Filter, InferenceRequest,
    Picker, PoolSnapshot, Scheduler, SchedulerProfile, SingleProfileHandler,
};

/// Leaves the pool position of the endpoint named in the prompt, stamped with the decision.
#[derive(Debug, Default)]
struct Producer {
    runs: AtomicUsize,
}

#[derive(Default)]
struct Chosen(Option<(u64, u32)>);

impl DataProducer for Producer {
    fn produce(&self, state: &mut CycleState, request: &InferenceRequest, pool: &PoolSnapshot) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let stamp = state.decision_stamp();
        let position = pool.endpoints().iter().position(|s| *s.endpoint.name == *request.prompt);
        state.scratch::<Chosen>().0 = position.map(|position| (stamp, position as u32));
    }
}

/// Keeps the produced position, if it was produced for this decision.
#[derive(Debug)]
struct KeepChosen;

impl Filter for KeepChosen {
    fn filter(
        &self,
        state: &mut CycleState,
        _: &InferenceRequest,
        _: &PoolSnapshot,
        c: &mut Vec<u32>,
    ) {
        let stamp = state.decision_stamp();
        if let Some((produced_for, position)) = state.scratch::<Chosen>().0
            && produced_for == stamp
        {
            c.retain(|&index| index == position);
        }
    }
}

#[derive(Debug)]
struct First;

impl Picker for First {
    fn pick(&self, _: &mut CycleState, _: Candidates<'_>, _: &[f64], picked: &mut Vec<u32>) {
        picked.push(0);
    }
}

#[test]
fn producers_run_once_per_decision_before_the_filters() {
    let producer = Arc::new(Producer::default());
    let profile = SchedulerProfile::new("default", "first", Arc::new(First))
        .with_filter("keep", Arc::new(KeepChosen));
    let scheduler = Scheduler::new(vec![profile], Arc::new(SingleProfileHandler))
        .with_data_producer(producer.clone());
    let pool = Arc::new(PoolSnapshot::new((0..3).map(|i| {
        EndpointState::new(
            Endpoint::new(([10, 0, 0, 1], 8000 + i).into()).with_name(format!("e{i}")),
        )
    })));
    for (prompt, port) in [("e2", 8002), ("e1", 8001), ("none", 8000)] {
        let result = scheduler.schedule(&InferenceRequest::new("m", prompt), &pool).unwrap();
        assert_eq!(result.primary().endpoint.address.port(), port, "{prompt}");
    }
    assert_eq!(producer.runs.load(Ordering::Relaxed), 3);
}
