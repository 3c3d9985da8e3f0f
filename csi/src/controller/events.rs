//! What a user must know about a volume, told as Kubernetes Events on its
//! `ZebuVolume` (`kubectl describe zebuvolume ID`) and, when the volume was
//! provisioned for a PersistentVolumeClaim, on that claim too (`kubectl
//! describe pvc NAME`, where users look): a replica lost (the volume is
//! degraded), replaced, rebuilt; a scrub that found corrupt blocks.
//!
//! Invariant: publishing never delays or fails the work it reports: events
//! go out from a task of their own, and one volume repeats one reason at
//! most once per [`REPEAT_AFTER`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
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
    /// A scrub found blocks whose data does not match their checksums.
    ScrubFoundCorruption,
}

impl VolumeEvent {
    fn reason(self) -> &'static str {
        match self {
            VolumeEvent::ReplicaLost => "ReplicaLost",
            VolumeEvent::ReplicaReplaced => "ReplicaReplaced",
            VolumeEvent::Rebuilt => "Rebuilt",
            VolumeEvent::ScrubFoundCorruption => "ScrubFoundCorruption",
        }
    }

    fn kind(self) -> EventType {
        match self {
            VolumeEvent::ReplicaLost | VolumeEvent::ScrubFoundCorruption => EventType::Warning,
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
            let zv = kube::Api::<ZebuVolume>::all(client.clone())
                .get_opt(&volume)
                .await
                .ok()
                .flatten();
            let mut about = vec![ObjectReference {
                api_version: Some("zebu.csi.dev/v1alpha1".into()),
                kind: Some("ZebuVolume".into()),
                name: Some(volume.clone()),
                uid: zv.as_ref().and_then(|v| v.metadata.uid.clone()),
                ..ObjectReference::default()
            }];
            if let Some(claim) = zv.and_then(|v| v.spec.claim) {
                // An Event names its object's uid; a claim that is gone gets none.
                let pvc = kube::Api::<PersistentVolumeClaim>::namespaced(client, &claim.namespace)
                    .get_opt(&claim.name)
                    .await;
                if let Ok(Some(pvc)) = pvc {
                    about.push(ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("PersistentVolumeClaim".into()),
                        namespace: Some(claim.namespace.clone()),
                        name: Some(claim.name.clone()),
                        uid: pvc.metadata.uid,
                        ..ObjectReference::default()
                    });
                }
            }
            for reference in about {
                // On the claim, say which volume (the claim's user may not know).
                let note = if reference.kind.as_deref() == Some("ZebuVolume") {
                    note.clone()
                } else {
                    format!("volume {volume}: {note}")
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
            }
        });
    }
}
