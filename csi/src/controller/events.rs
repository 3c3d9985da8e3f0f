//! What a user must know about a volume, told as Kubernetes Events on its
//! `ZebuVolume` (`kubectl describe zebuvolume ID`, `kubectl get events`):
//! a replica lost, replaced, rebuilt.
//!
//! Invariant: publishing never delays or fails the work it reports: events
//! go out from a task of their own, and one volume repeats one reason at
//! most once per [`REPEAT_AFTER`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::store::crd::ZebuVolume;

/// Shortest interval between two events of one reason on one volume.
pub const REPEAT_AFTER: Duration = Duration::from_secs(300);

/// Something that happened to a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeEvent {
    /// A replica stopped answering: the volume is degraded.
    ReplicaLost,
    /// A lost replica was replaced by a new one elsewhere.
    ReplicaReplaced,
    /// A replica caught up and serves again.
    Rebuilt,
}

impl VolumeEvent {
    fn reason(self) -> &'static str {
        match self {
            VolumeEvent::ReplicaLost => "ReplicaLost",
            VolumeEvent::ReplicaReplaced => "ReplicaReplaced",
            VolumeEvent::Rebuilt => "Rebuilt",
        }
    }

    fn kind(self) -> EventType {
        match self {
            VolumeEvent::ReplicaLost => EventType::Warning,
            VolumeEvent::ReplicaReplaced | VolumeEvent::Rebuilt => EventType::Normal,
        }
    }
}

/// Where volume events go.
pub trait EventSink: Send + Sync {
    /// Tells that `event` happened to volume `volume` (`note`: one line for
    /// people).
    fn volume_event(&self, volume: &str, event: VolumeEvent, note: String);
}

/// Events on the volumes' custom resources, through the API server.
pub struct KubeEvents {
    recorder: Recorder,
    client: kube::Client,
    last: Mutex<HashMap<(String, VolumeEvent), Instant>>,
}

impl KubeEvents {
    /// Events reported as `instance` of the Zebu controller.
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: "zebu-csi-controller".into(),
            instance: Some(instance.to_owned()),
        };
        KubeEvents {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            last: Mutex::new(HashMap::new()),
        }
    }
}

impl EventSink for KubeEvents {
    fn volume_event(&self, volume: &str, event: VolumeEvent, note: String) {
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let key = (volume.to_owned(), event);
            if last.get(&key).is_some_and(|t| t.elapsed() < REPEAT_AFTER) {
                return;
            }
            last.insert(key, Instant::now());
        }
        let (recorder, client, volume) = (
            self.recorder.clone(),
            self.client.clone(),
            volume.to_owned(),
        );
        tokio::spawn(async move {
            let api = kube::Api::<ZebuVolume>::all(client);
            let uid = match api.get_opt(&volume).await {
                Ok(Some(v)) => v.metadata.uid,
                _ => None,
            };
            let reference = ObjectReference {
                api_version: Some("zebu.csi.dev/v1alpha1".into()),
                kind: Some("ZebuVolume".into()),
                name: Some(volume.clone()),
                uid,
                ..ObjectReference::default()
            };
            let ev = Event {
                type_: event.kind(),
                reason: event.reason().into(),
                note: Some(note),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!(volume = %volume, reason = event.reason(), error = %e, "cannot publish an event");
            }
        });
    }
}
