//! Leader election on a `coordination.k8s.io/v1` Lease, so that among several EPP replicas
//! one serves and the others stand by with their state warm (`--ha-enable-leader-election`).
//!
//! The algorithm is client-go's, which the Go EPP uses through controller-runtime: read the
//! Lease; take it when it is free or its holder has not renewed it for a lease duration
//! (measured on this replica's clock from when the record last changed, so clocks need not
//! agree); renew it every retry period while held; every write carries the resourceVersion
//! read, so of two replicas racing for it the API server lets one win (409 for the other).
//! A leader that cannot renew for the renew deadline steps down. Releasing on shutdown
//! hands over at once instead of after a lease duration.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Timings and names of an election.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name (the Go EPP's: `epp-<namespace>-<pool>.llm-d.ai`).
    pub lease_name: String,
    /// This replica's identity, unique among the candidates.
    pub identity: String,
    /// How long a holder's claim lasts without renewal (15 s, controller-runtime's default).
    pub lease_duration: Duration,
    /// How long a leader keeps leading while its renewals fail (10 s).
    pub renew_deadline: Duration,
    /// How often candidates try and leaders renew (2 s).
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// The Go EPP's lease for the pool `pool` of `namespace`, with controller-runtime's
    /// timings and an identity from `POD_NAME` (else the host name) and a random suffix.
    pub fn for_pool(namespace: &str, pool: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            lease_name: format!("epp-{namespace}-{pool}.llm-d.ai"),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname").ok().map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "epp".to_owned());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Timestamp::now().as_nanosecond() as u128);
    format!("{host}_{:016x}", hasher.finish())
}

/// A running candidacy; dropping it stops campaigning without releasing the Lease.
#[derive(Debug)]
pub struct LeaderElector {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for LeaderElector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaderElector {
    /// Starts campaigning (on the current Tokio runtime).
    pub fn start(client: kube::Client, config: LeaderElectionConfig) -> Self {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let (sender, leading) = watch::channel(false);
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut candidate = Candidate { api, config, observed: None, renewed_at: None };
            loop {
                let leads = candidate.try_acquire_or_renew().await;
                sender.send_if_modified(|current| {
                    let changed = *current != leads;
                    if changed {
                        tracing::info!(leading = leads, identity = %candidate.config.identity, "leader election");
                    }
                    *current = leads;
                    changed
                });
                tokio::select! {
                    _ = tokio::time::sleep(candidate.config.retry_period) => {}
                    _ = &mut stopped => {
                        if leads {
                            candidate.release().await;
                        }
                        sender.send_replace(false);
                        return;
                    }
                }
            }
        });
        Self { leading, stop: Some(stop), task }
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// A receiver of leadership changes (the current state marked seen).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        let mut receiver = self.leading.clone();
        receiver.mark_unchanged();
        receiver
    }

    /// Stops campaigning and, if leading, releases the Lease so another replica takes over
    /// at its next try.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

/// What tells one claim from the next: the holder and its last renewal.
type LeaseRecord = (Option<String>, Option<Timestamp>);

struct Candidate {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    /// The record last read, and when this replica first saw it.
    observed: Option<(LeaseRecord, Instant)>,
    /// When this replica last renewed successfully.
    renewed_at: Option<Instant>,
}

impl Candidate {
    /// One round; true when this replica leads after it.
    async fn try_acquire_or_renew(&mut self) -> bool {
        match self.round().await {
            Ok(leads) => {
                if leads {
                    self.renewed_at = Some(Instant::now());
                }
                leads
            }
            Err(error) => {
                tracing::warn!(%error, lease = %self.config.lease_name, "leader election round failed");
                // A leader keeps leading through failures shorter than the renew deadline.
                self.renewed_at.is_some_and(|at| at.elapsed() < self.config.renew_deadline)
            }
        }
    }

    async fn round(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_seconds =
            i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return won(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|holder| !holder.is_empty());
        let record = (holder.clone(), spec.renew_time.as_ref().map(|time| time.0));
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.observed = Some((record, Instant::now()));
        }
        let held_for = spec.lease_duration_seconds.map_or(self.config.lease_duration, |seconds| {
            Duration::from_secs(seconds.max(0) as u64)
        });
        let unchanged_for = self.observed.as_ref().map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if holder.is_some() && !mine && unchanged_for < held_for {
            return Ok(false);
        }
        let mut next = lease;
        let transitions = spec.lease_transitions.unwrap_or(0);
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_seconds),
            acquire_time: if mine { spec.acquire_time } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        // The read resourceVersion rides along: a replica that raced ahead makes this a 409.
        won(self.api.replace(&self.config.lease_name, &PostParams::default(), &next).await)
    }

    /// Gives the Lease up: no holder, so the next candidate's round takes it.
    async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.config.lease_name, "leader lease released"),
            Err(error) => tracing::warn!(%error, "leader lease not released; it expires instead"),
        }
    }
}

/// A write's outcome: taken, lost to a racing replica (409), or failed.
fn won(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}
