//! Leader election through a coordination.k8s.io Lease, so that of several
//! controller replicas only one writes. Every write to the Lease carries the
//! resourceVersion read before it: two replicas can never both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;

use crate::Result;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    /// How long a lease lasts without renewal before another replica may take it.
    pub duration: Duration,
    /// How often the holder renews (well inside `duration`).
    pub renew_every: Duration,
}

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Create,
    Renew,
    /// The holder let it expire (or there is none): take it over.
    Take,
    /// Someone else holds a live lease.
    Wait,
}

/// The pure part of one election round.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else { return Decision::Create };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Decision::Renew,
        None | Some("") => Decision::Take,
        Some(_) => {
            let expires = spec.renew_time.and_then(|t| {
                t.0.checked_add(SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)))).ok()
            });
            match expires {
                Some(expiry) if expiry > now => Decision::Wait,
                _ => Decision::Take,
            }
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    pub fn new(api: Api<Lease>, config: LeaseConfig) -> Self {
        Self { api, config }
    }

    /// One round: returns whether this replica holds the lease afterwards.
    pub async fn round(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.config.name).await?;
        let mine = |acquire: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs() as i32),
            acquire_time: acquire,
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let result = match (decide(current.as_ref(), &self.config.identity, now), current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.config.name.clone()), ..ObjectMeta::default() },
                    spec: Some(mine(Some(MicroTime(now)), 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let spec = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(mine(spec.acquire_time, spec.lease_transitions.unwrap_or(0)));
                self.api.replace(&self.config.name, &PostParams::default(), &lease).await
            }
            (Decision::Take, Some(mut lease)) => {
                let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0) + 1;
                lease.spec = Some(mine(Some(MicroTime(now)), transitions));
                self.api.replace(&self.config.name, &PostParams::default(), &lease).await
            }
            (Decision::Renew | Decision::Take, None) => return Ok(false),
        };
        match result {
            Ok(_) => Ok(true),
            // Another replica wrote first: it wins this round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.round().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election round failed"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Gives the lease up, if this replica holds it, so that another replica
    /// takes over at once instead of after the lease expires.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            acquire_time: None,
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_duration_seconds: Some(1),
            ..spec
        });
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Taken by another replica meanwhile: nothing left to release.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Renews until leadership is lost (another holder, or no successful renewal for
    /// longer than is safe), then returns.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        // Stop writing before the lease could expire for the others.
        let give_up_after = self.config.duration.saturating_sub(self.config.renew_every);
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.round().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!("leader lease taken by another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leader lease");
                    if last_renewal.elapsed() >= give_up_after {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};

    use super::*;
    use crate::fake_api;

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kandle-system/leases";

    /// A fake API server holding Leases by name.
    fn lease_server() -> (kube::Client, Arc<Mutex<HashMap<String, Value>>>) {
        let leases: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let store = leases.clone();
        let (client, _log) = fake_api::client(move |method, path, body| {
            let mut leases = store.lock().unwrap_or_else(|p| p.into_inner());
            let name = path.strip_prefix(LEASES).unwrap_or("").trim_start_matches('/').to_string();
            match method.as_str() {
                "GET" => match leases.get(&name) {
                    Some(lease) => (200, lease.clone()),
                    None => (404, json!({"kind": "Status", "code": 404, "reason": "NotFound"})),
                },
                "POST" => {
                    let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                    leases.insert(name, body.clone());
                    (201, body.clone())
                }
                _ => {
                    leases.insert(name, body.clone());
                    (200, body.clone())
                }
            }
        });
        (client, leases)
    }

    fn elector(client: &kube::Client, name: &str, identity: &str) -> Elector {
        Elector::new(
            Api::namespaced(client.clone(), "kandle-system"),
            LeaseConfig {
                name: name.into(),
                identity: identity.into(),
                duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(4),
            },
        )
    }

    /// Two installations in one namespace, each with its own Lease, both lead.
    #[tokio::test]
    async fn each_release_leads_through_its_own_lease() {
        let (client, leases) = lease_server();
        assert!(elector(&client, "first-kandle-leader", "pod-a").round().await.expect("round"));
        assert!(elector(&client, "second-kandle-leader", "pod-b").round().await.expect("round"));
        let leases = leases.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(leases["first-kandle-leader"]["spec"]["holderIdentity"], "pod-a");
        assert_eq!(leases["second-kandle-leader"]["spec"]["holderIdentity"], "pod-b");
    }

    /// A replica that stops releases its Lease; another takes it at once.
    #[tokio::test]
    async fn the_lease_is_released_on_shutdown() {
        let (client, leases) = lease_server();
        let leader = elector(&client, "kandle-leader", "pod-a");
        let standby = elector(&client, "kandle-leader", "pod-b");
        assert!(leader.round().await.expect("round"));
        assert!(!standby.round().await.expect("round"), "a live lease is not taken");
        leader.release().await.expect("release");
        let released = leases.lock().unwrap_or_else(|p| p.into_inner())["kandle-leader"].clone();
        assert!(released["spec"].get("holderIdentity").is_none_or(Value::is_null), "{released}");
        assert!(standby.round().await.expect("round"), "taken at once, not after expiry");
        // Releasing a lease held by another replica changes nothing.
        leader.release().await.expect("release");
        assert_eq!(
            leases.lock().unwrap_or_else(|p| p.into_inner())["kandle-leader"]["spec"]["holderIdentity"],
            "pod-b"
        );
    }

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(
                    now().checked_sub(SignedDuration::from_secs(renewed_secs_ago)).expect("in range"),
                )),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("valid")
    }

    #[test]
    fn elections() {
        assert_eq!(decide(None, "a", now()), Decision::Create);
        assert_eq!(decide(Some(&lease(Some("a"), 3, 15)), "a", now()), Decision::Renew);
        assert_eq!(decide(Some(&lease(Some("b"), 3, 15)), "a", now()), Decision::Wait);
        assert_eq!(decide(Some(&lease(Some("b"), 16, 15)), "a", now()), Decision::Take);
        assert_eq!(decide(Some(&lease(None, 1, 15)), "a", now()), Decision::Take);
        let mut no_renewal = lease(Some("b"), 0, 15);
        if let Some(spec) = no_renewal.spec.as_mut() {
            spec.renew_time = None;
        }
        assert_eq!(decide(Some(&no_renewal), "a", now()), Decision::Take);
    }
}
