//! Scheduled scrubs: at an interval, every RW replica reads its data back
//! and checks it against its stored CRCs, and a replica found holding
//! corrupt blocks is resynced from a healthy one (as `ctl scrub --repair`
//! does; safe, because the CRCs say which copy is bad).
//!
//! The schedule counts from the replicas, not from the engine's start: each
//! replica records when its last complete scrub that found nothing corrupt
//! finished (`ReplicaInfo::last_clean_scrub_unix`; a replica never scrubbed
//! clean counts from its oldest layer's creation). A volume is due when its
//! least recently scrubbed RW replica is, so a volume attached a few hours
//! at a time is still scrubbed on schedule across engine restarts, a manual
//! scrub moves the next scheduled one back, and a replica repaired after a
//! scrub found rot is scrubbed again at once (its repair is checked).
//!
//! Invariant: one scrub of a volume runs at a time, manual or scheduled
//! (`Volume::scrub` holds the volume's scrub lock).
//! Invariant: a scheduled scrub that failed, or left corrupt blocks it could
//! not repair, is retried after [`RETRY_AFTER`], then after twice as long
//! each time it fails again, never waiting longer than the interval: a
//! replica whose scrub keeps failing must not keep the disk busy.

use std::sync::Weak;
use std::time::Duration;

use zebu_proto::engine as epb;
use zebu_proto::replica as pb;

use super::*;
use zebu_replica_client::LONG_CALL_TIMEOUT;

/// Earliest retry of a scheduled scrub that did not complete everywhere.
pub const RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The schedule is looked at again at least this often, so a replica added
/// meanwhile (or a manual scrub) is taken into account.
const MAX_NAP: Duration = Duration::from_secs(600);

/// How a volume is scrubbed on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Time between scrubs of each replica; `None`: no scheduled scrubs.
    pub interval: Option<Duration>,
    /// Read rate limit of a scheduled scrub, per replica; 0 is no limit.
    pub max_bytes_per_sec: u64,
}

/// What the engine knows of its volume's scrubs, for the status.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// When the next scheduled scrub starts; 0 if none is planned.
    pub next_unix: i64,
    /// A scrub (scheduled or manual) is running.
    pub running: bool,
    /// Scrubs finished since the engine started.
    pub runs: u64,
    /// Replicas those scrubs resynced.
    pub replicas_repaired: u64,
    /// When the last of them finished; 0 if none has.
    pub last_finished_unix: i64,
    /// Its reports.
    pub last: Vec<epb::ReplicaScrub>,
}

impl Record {
    /// The status form, with the policy.
    pub fn status(&self, policy: &Policy) -> epb::ScrubStatus {
        epb::ScrubStatus {
            interval_seconds: policy.interval.map_or(0, |d| d.as_secs()),
            max_bytes_per_sec: policy.max_bytes_per_sec,
            next_unix: self.next_unix,
            running: self.running,
            runs: self.runs,
            replicas_repaired: self.replicas_repaired,
            last_finished_unix: self.last_finished_unix,
            last: self.last.clone(),
        }
    }
}

/// When the replica described by `info` is next due: its last scrub (or,
/// if it never had one, its oldest layer's creation) plus `interval`.
pub fn replica_due(info: &pb::ReplicaInfo, interval: Duration) -> i64 {
    let since = if info.last_clean_scrub_unix > 0 {
        info.last_clean_scrub_unix
    } else {
        info.chain.iter().map(|l| l.created_unix).min().unwrap_or(0)
    };
    since.saturating_add(i64::try_from(interval.as_secs()).unwrap_or(i64::MAX))
}

/// When the volume is next due: the earliest of its RW replicas, no earlier
/// than `not_before`. `None` without replicas to scrub.
pub fn volume_due<'a>(
    rw: impl IntoIterator<Item = &'a pb::ReplicaInfo>,
    interval: Duration,
    not_before: i64,
) -> Option<i64> {
    rw.into_iter()
        .map(|i| replica_due(i, interval))
        .min()
        .map(|d| d.max(not_before))
}

/// How long a replica's scrub may take: the bound of every long call, plus,
/// under a rate limit, the time to read what the replica stores at that
/// rate (a week of it at 64 MiB/s is 37 TiB; a paced scrub of a large
/// replica must not be cut off after an hour and start over).
pub fn replica_deadline(stored_bytes: u64, max_bytes_per_sec: u64) -> Duration {
    let paced = stored_bytes.checked_div(max_bytes_per_sec).unwrap_or(0);
    LONG_CALL_TIMEOUT.saturating_add(Duration::from_secs(paced))
}

/// What a replica stores, over all its layers, from its info.
pub fn stored_bytes(info: &pb::ReplicaInfo) -> u64 {
    info.chain.iter().map(|l| l.allocated_bytes).sum()
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Runs `policy`'s schedule for `volume` until the volume is dropped.
pub async fn run(volume: Weak<Volume>, policy: Policy) {
    let Some(interval) = policy.interval else {
        return;
    };
    let mut retry = RETRY_AFTER.min(interval);
    let mut not_before = 0;
    loop {
        let due = {
            let Some(v) = volume.upgrade() else { return };
            let infos = v.rw_replica_infos().await;
            let due = volume_due(&infos, interval, not_before);
            v.set_next_scrub(due.unwrap_or(0));
            due
        };
        let now = now_unix();
        let wait = match due {
            Some(d) if d <= now => Duration::ZERO,
            Some(d) => Duration::from_secs(d.abs_diff(now)).min(MAX_NAP),
            None => MAX_NAP,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            continue;
        }
        let Some(v) = volume.upgrade() else { return };
        tracing::info!(
            rate = policy.max_bytes_per_sec,
            "scheduled scrub: checking every RW replica against its stored CRCs"
        );
        let reports = v.scrub(true, policy.max_bytes_per_sec).await;
        let checked: u64 = reports.iter().map(|r| r.blocks_checked).sum();
        let repaired = reports.iter().filter(|r| r.repaired).count();
        let unresolved: Vec<&str> = reports
            .iter()
            .filter(|r| r.unresolved())
            .map(|r| r.address.as_str())
            .collect();
        if unresolved.is_empty() {
            tracing::info!(checked, repaired, "scheduled scrub finished");
            not_before = 0;
            retry = RETRY_AFTER.min(interval);
        } else {
            // Each replica's own failure was logged where it happened.
            tracing::warn!(
                checked,
                repaired,
                unresolved = %unresolved.join(", "),
                retry_in_secs = retry.as_secs(),
                "scheduled scrub did not complete on every replica"
            );
            not_before = now_unix().saturating_add(retry.as_secs() as i64);
            retry = retry.saturating_mul(2).min(interval);
        }
    }
}

/// Scrubs run by hand or on schedule.
impl Volume {
    /// Checks every block of every RW replica against its stored CRC (each
    /// replica's `Scrub`, all at once). With `repair`, each replica found
    /// with corrupt blocks is then, one at a time, removed and added back:
    /// the resync copies the blocks whose CRCs differ from a healthy
    /// replica's, and the replica's corrupt blocks were given CRC entries
    /// that differ. A replica that cannot be repaired (the last RW one, or
    /// a rebuild that fails) says why in its report. Each replica reads no
    /// faster than `max_bytes_per_sec` (0: no limit). Scrubs run one at a
    /// time; a second waits for the first (see [`Volume::try_scrub`]).
    pub async fn scrub(&self, repair: bool, max_bytes_per_sec: u64) -> Vec<epb::ReplicaScrub> {
        let one = self.scrub_lock.lock().await;
        self.scrub_holding(one, repair, max_bytes_per_sec).await
    }

    /// [`Volume::scrub`], or `None` at once if a scrub is already running.
    pub async fn try_scrub(
        &self,
        repair: bool,
        max_bytes_per_sec: u64,
    ) -> Option<Vec<epb::ReplicaScrub>> {
        let one = self.scrub_lock.try_lock().ok()?;
        Some(self.scrub_holding(one, repair, max_bytes_per_sec).await)
    }

    /// A scrub, holding the scrub lock.
    pub(super) async fn scrub_holding(
        &self,
        _one: tokio::sync::MutexGuard<'_, ()>,
        repair: bool,
        max_bytes_per_sec: u64,
    ) -> Vec<epb::ReplicaScrub> {
        self.with_scrub_record(|r| r.running = true);
        // Also when the caller goes away mid-scrub (this future dropped).
        let _running = Cleanup(|| self.with_scrub_record(|r| r.running = false));
        let reports = self.scrub_once(repair, max_bytes_per_sec).await;
        self.with_scrub_record(|r| {
            r.runs += 1;
            r.replicas_repaired += reports.iter().filter(|x| x.repaired).count() as u64;
            r.last_finished_unix = now_unix();
            r.last = reports.clone();
        });
        reports
    }

    pub(super) fn with_scrub_record<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.scrub_record.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The scrub schedule the volume was started with.
    pub fn scrub_policy(&self) -> Policy {
        self.scrub_policy
    }

    /// Records when the next scheduled scrub starts (0: none planned).
    pub fn set_next_scrub(&self, unix: i64) {
        self.with_scrub_record(|r| r.next_unix = unix);
    }

    /// What the RW replicas say of themselves (those that answer).
    pub async fn rw_replica_infos(&self) -> Vec<pb::ReplicaInfo> {
        let controls: Vec<Control> = {
            let inner = self.lock();
            inner
                .members
                .iter()
                .filter(|(r, _)| inner.sm.mode(**r) == Some(Mode::Rw))
                .map(|(_, m)| m.control.clone())
                .collect()
        };
        let infos = futures::future::join_all(controls.iter().map(|c| c.info())).await;
        infos.into_iter().filter_map(Result::ok).collect()
    }

    pub(super) async fn scrub_once(
        &self,
        repair: bool,
        max_bytes_per_sec: u64,
    ) -> Vec<epb::ReplicaScrub> {
        let targets: Vec<(String, Control)> = {
            let inner = self.lock();
            inner
                .members
                .iter()
                .filter(|(r, _)| inner.sm.mode(**r) == Some(Mode::Rw))
                .map(|(_, m)| (m.uuid.clone(), m.control.clone()))
                .collect()
        };
        let epoch = self.epoch;
        let scrubs = targets.iter().map(|(id, c)| async move {
            // Without a rate limit the long-call bound alone applies. A
            // replica that cannot say what it stores fails the scrub call too.
            let stored = if max_bytes_per_sec == 0 {
                0
            } else {
                c.info().await.map_or(0, |i| stored_bytes(&i))
            };
            let deadline = replica_deadline(stored, max_bytes_per_sec);
            let r = c
                .call_within(deadline, "scrubbing", |mut cl| async move {
                    cl.scrub(pb::ScrubRequest {
                        epoch,
                        max_bytes_per_sec,
                    })
                    .await
                })
                .await;
            let mut report = epb::ReplicaScrub {
                address: c.addr.clone(),
                id: id.clone(),
                ..Default::default()
            };
            match r {
                Ok(s) => {
                    report.blocks_checked = s.blocks_checked;
                    report.corrupt_blocks = s.corrupt_blocks;
                    report.corrupt = s
                        .corrupt
                        .iter()
                        .map(|b| {
                            let layer = if b.layer.is_empty() { "head" } else { &b.layer };
                            format!("{layer}:{}", b.block)
                        })
                        .collect();
                }
                Err(e) => report.error = e.to_string(),
            }
            report
        });
        let mut reports = futures::future::join_all(scrubs).await;
        {
            let mut inner = self.lock();
            for r in &reports {
                if r.corrupt_blocks > 0 {
                    tracing::warn!(
                        replica = %r.address,
                        corrupt = r.corrupt_blocks,
                        repair,
                        "scrub found corrupt blocks"
                    );
                    inner.corrupt.insert(r.id.clone());
                } else if r.error.is_empty() {
                    inner.corrupt.remove(&r.id);
                }
            }
        }
        if repair {
            for r in reports.iter_mut().filter(|r| r.corrupt_blocks > 0) {
                match self.resync(&r.address).await {
                    Ok(()) => {
                        r.repaired = true;
                        self.lock().corrupt.remove(&r.id);
                    }
                    Err(why) => r.error = format!("repair failed: {why}"),
                }
            }
        }
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn info(last_clean_scrub_unix: i64, created: &[i64]) -> pb::ReplicaInfo {
        pb::ReplicaInfo {
            last_clean_scrub_unix,
            chain: created
                .iter()
                .map(|&c| pb::LayerInfo {
                    created_unix: c,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    pub(super) fn a_replica_counts_from_its_last_scrub_or_else_its_oldest_layer() {
        let day = Duration::from_secs(86_400);
        assert_eq!(replica_due(&info(1_000, &[10, 20]), day), 87_400);
        assert_eq!(replica_due(&info(0, &[500, 20]), day), 86_420);
        assert_eq!(replica_due(&info(0, &[]), day), 86_400);
    }

    #[test]
    pub(super) fn a_paced_scrub_gets_the_time_its_rate_needs() {
        let hour = LONG_CALL_TIMEOUT;
        assert_eq!(
            replica_deadline(1 << 40, 0),
            hour,
            "no limit: the long-call bound"
        );
        // 1 TiB at 64 MiB/s: 16,384 s on top.
        assert_eq!(
            replica_deadline(1 << 40, 64 << 20),
            hour + Duration::from_secs(16_384)
        );
        let mut i = info(0, &[]);
        i.chain = [3u64, 5]
            .iter()
            .map(|&mib| pb::LayerInfo {
                allocated_bytes: mib << 20,
                ..Default::default()
            })
            .collect();
        assert_eq!(stored_bytes(&i), 8 << 20);
    }

    #[test]
    pub(super) fn the_volume_is_due_with_its_least_recently_scrubbed_replica() {
        let h = Duration::from_secs(3600);
        let rw = [info(10_000, &[0]), info(2_000, &[0]), info(0, &[5_000])];
        assert_eq!(volume_due(&rw, h, 0), Some(5_600));
        // A failed run pushes the retry back.
        assert_eq!(volume_due(&rw, h, 9_000), Some(9_000));
        assert_eq!(volume_due(&[], h, 0), None);
    }
}
