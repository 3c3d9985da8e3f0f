//! What the commands print: views of CSI and engine replies (serialised as
//! JSON with `-o json`) and their human renderings.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;
use zebu_proto::csi::{Snapshot, Volume, VolumeCondition, volume_content_source};
use zebu_proto::duration::span;
use zebu_proto::engine::{RebuildProgress, ReplicaStatus, ScrubStatus, VolumeStatus};

use zebu_common::context::{
    VOLUME_ATTACHED_NODE, VOLUME_ENGINE, VOLUME_REPLICA_PLACEMENT, VOLUME_REPLICAS,
};

/// `1.0 GiB`, `512.0 MiB`, `100 B` (binary units, one decimal).
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB rounds to "1024.0 KiB"; say "1.0 MiB" instead.
    if format!("{v:.1}") == "1024.0" && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A byte count from CSI (signed; negative means unknown and reads as 0).
pub fn csi_bytes(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// `2024-05-01 12:34:56Z` for a Unix time in seconds (UTC).
pub fn format_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A plain text table: columns padded to their widest cell.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Number of rows, not counting the headers.
    pub fn len(&self) -> usize {
        self.rows.len() - 1
    }

    /// No rows besides the headers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let ncols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; ncols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 < r.len() {
                    let _ = write!(line, "{c:<w$}  ", w = widths[i]);
                } else {
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key: value` lines with the values aligned.
pub fn render_fields(fields: &[(&str, String)]) -> String {
    let w = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in fields {
        let mut lines = v.lines();
        let first = lines.next().unwrap_or("");
        let _ = writeln!(out, "{:<w$}  {first}", format!("{k}:"));
        for l in lines {
            let _ = writeln!(out, "{:<w$}  {l}", "");
        }
    }
    out
}

/// Where one replica lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Node name.
    pub node: String,
    /// Replica address (`host:port`).
    pub address: String,
}

/// Parses `VOLUME_REPLICA_PLACEMENT`: `node:host:port` joined by `,`.
pub fn parse_placement(s: &str) -> Vec<Placement> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once(':') {
            Some((node, address)) => Placement {
                node: node.to_owned(),
                address: address.to_owned(),
            },
            None => Placement {
                node: p.to_owned(),
                address: String::new(),
            },
        })
        .collect()
}

/// A volume condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// The volume is not healthy.
    pub abnormal: bool,
    /// What the driver says about it.
    pub message: String,
}

/// Where a volume was created from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A snapshot id.
    Snapshot(String),
    /// A volume id.
    Volume(String),
}

/// A volume as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeView {
    /// Volume id.
    pub id: String,
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Number of replicas, if the driver says.
    pub replicas: Option<u32>,
    /// Health as reported by the driver (`None`: not reported).
    pub condition: Option<Condition>,
    /// Nodes the volume is published to.
    pub published_nodes: Vec<String>,
    /// Node the volume is attached to (from the volume context).
    pub attached_node: Option<String>,
    /// Engine control address while attached.
    pub engine: Option<String>,
    /// Where the replicas live.
    pub placement: Vec<Placement>,
    /// Content source.
    pub source: Option<Source>,
    /// The whole volume context.
    pub context: BTreeMap<String, String>,
}

impl VolumeView {
    /// The view of a CSI volume and its status (published nodes, condition).
    pub fn new(v: &Volume, published: &[String], cond: Option<&VolumeCondition>) -> VolumeView {
        let ctx = &v.volume_context;
        let get = |k: &str| ctx.get(k).filter(|s| !s.is_empty()).cloned();
        VolumeView {
            id: v.volume_id.clone(),
            size_bytes: csi_bytes(v.capacity_bytes),
            replicas: get(VOLUME_REPLICAS).and_then(|s| s.parse().ok()),
            condition: cond.map(|c| Condition {
                abnormal: c.abnormal,
                message: c.message.clone(),
            }),
            published_nodes: published.to_vec(),
            attached_node: get(VOLUME_ATTACHED_NODE),
            engine: get(VOLUME_ENGINE),
            placement: get(VOLUME_REPLICA_PLACEMENT)
                .map(|s| parse_placement(&s))
                .unwrap_or_default(),
            source: v
                .content_source
                .as_ref()
                .and_then(|s| s.r#type.as_ref())
                .map(|t| match t {
                    volume_content_source::Type::Snapshot(s) => {
                        Source::Snapshot(s.snapshot_id.clone())
                    }
                    volume_content_source::Type::Volume(v) => Source::Volume(v.volume_id.clone()),
                }),
            context: sorted(ctx),
        }
    }

    /// `ok`, `ABNORMAL: why` or `-` (not reported).
    pub fn condition_text(&self) -> String {
        match &self.condition {
            None => "-".to_owned(),
            Some(c) if c.abnormal => {
                if c.message.is_empty() {
                    "ABNORMAL".to_owned()
                } else {
                    format!("ABNORMAL: {}", c.message)
                }
            }
            Some(_) => "ok".to_owned(),
        }
    }

    /// The node(s) the volume is attached to, or `-`.
    pub fn attached_text(&self) -> String {
        if !self.published_nodes.is_empty() {
            self.published_nodes.join(",")
        } else {
            self.attached_node.clone().unwrap_or_else(|| "-".to_owned())
        }
    }
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// The `zebu volume list` table.
pub fn volumes_table(vols: &[VolumeView]) -> String {
    let mut t = Table::new(&["ID", "SIZE", "REPLICAS", "CONDITION", "ATTACHED"]);
    for v in vols {
        t.row(vec![
            v.id.clone(),
            format_size(v.size_bytes),
            opt(&v.replicas),
            v.condition_text(),
            v.attached_text(),
        ]);
    }
    t.render()
}

/// The `zebu volume get` text.
pub fn volume_details(v: &VolumeView, snaps: &[SnapshotView]) -> String {
    let mut f = vec![
        ("ID", v.id.clone()),
        (
            "Size",
            format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
        ),
        ("Replicas", opt(&v.replicas)),
        ("Condition", v.condition_text()),
    ];
    let attached = match (v.attached_text().as_str(), &v.engine) {
        ("-", _) => "no".to_owned(),
        (n, Some(e)) => format!("{n} (engine {e})"),
        (n, None) => n.to_owned(),
    };
    f.push(("Attached", attached));
    if let Some(s) = &v.source {
        f.push((
            "Source",
            match s {
                Source::Snapshot(id) => format!("snapshot {id}"),
                Source::Volume(id) => format!("volume {id}"),
            },
        ));
    }
    if !v.placement.is_empty() {
        let lines: Vec<String> = v
            .placement
            .iter()
            .map(|p| format!("{} {}", p.node, p.address))
            .collect();
        f.push(("Placement", lines.join("\n")));
    }
    let known = [
        VOLUME_REPLICAS,
        VOLUME_REPLICA_PLACEMENT,
        VOLUME_ENGINE,
        VOLUME_ATTACHED_NODE,
    ];
    let other: Vec<String> = v
        .context
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, val)| format!("{k}={val}"))
        .collect();
    if !other.is_empty() {
        f.push(("Context", other.join("\n")));
    }
    let mut out = render_fields(&f);
    out.push('\n');
    if snaps.is_empty() {
        out.push_str("No snapshots.\n");
    } else {
        out.push_str("Snapshots:\n");
        out.push_str(&snapshots_table(snaps));
    }
    out
}

/// A snapshot as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotView {
    /// Snapshot id.
    pub id: String,
    /// Volume it was taken of.
    pub source_volume_id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Creation time, Unix seconds.
    pub created_unix: Option<i64>,
    /// Creation time, `YYYY-MM-DD HH:MM:SSZ`.
    pub created: Option<String>,
    /// Usable as a volume source.
    pub ready: bool,
}

impl SnapshotView {
    /// The view of a CSI snapshot.
    pub fn new(s: &Snapshot) -> SnapshotView {
        let t = s.creation_time.as_ref().map(|t| t.seconds);
        SnapshotView {
            id: s.snapshot_id.clone(),
            source_volume_id: s.source_volume_id.clone(),
            size_bytes: csi_bytes(s.size_bytes),
            created_unix: t,
            created: t.map(format_time),
            ready: s.ready_to_use,
        }
    }
}

/// The `zebu snapshot list` table.
pub fn snapshots_table(snaps: &[SnapshotView]) -> String {
    let mut t = Table::new(&["ID", "VOLUME", "SIZE", "CREATED", "READY"]);
    for s in snaps {
        t.row(vec![
            s.id.clone(),
            s.source_volume_id.clone(),
            format_size(s.size_bytes),
            opt(&s.created),
            if s.ready { "yes" } else { "no" }.to_owned(),
        ]);
    }
    t.render()
}

/// Rebuild progress of one replica.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RebuildView {
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Bytes copied or checked so far.
    pub bytes_done: u64,
    /// Bytes to go through.
    pub bytes_total: u64,
    /// `bytes_done / bytes_total` in percent, if the total is known.
    pub percent: Option<f64>,
    /// Current rate.
    pub rate_bytes_per_sec: f64,
    /// Why it failed.
    pub error: Option<String>,
}

impl RebuildView {
    /// The view of an engine rebuild record (`None` if there is none).
    pub fn new(r: &RebuildProgress) -> Option<RebuildView> {
        if r.state.is_empty() {
            return None;
        }
        Some(RebuildView {
            state: r.state.clone(),
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
            percent: (r.bytes_total > 0)
                .then(|| r.bytes_done.min(r.bytes_total) as f64 * 100.0 / r.bytes_total as f64),
            rate_bytes_per_sec: r.rate_bytes_per_sec,
            error: Some(r.error.clone()).filter(|e| !e.is_empty()),
        })
    }

    /// `running 1.0 GiB/4.0 GiB (25%) 50.0 MiB/s`, `done`, `failed: why`.
    pub fn text(&self) -> String {
        match self.state.as_str() {
            "running" => {
                let mut s = format!(
                    "running {}/{}",
                    format_size(self.bytes_done),
                    format_size(self.bytes_total)
                );
                if let Some(p) = self.percent {
                    let _ = write!(s, " ({}%)", p.floor() as u64);
                }
                if self.rate_bytes_per_sec >= 1.0 {
                    let _ = write!(s, " {}/s", format_size(self.rate_bytes_per_sec as u64));
                }
                s
            }
            "failed" => match &self.error {
                Some(e) => format!("failed: {e}"),
                None => "failed".to_owned(),
            },
            other => other.to_owned(),
        }
    }
}

/// One replica as the CLI shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaView {
    /// Node, from the placement.
    pub node: Option<String>,
    /// Replica address.
    pub address: String,
    /// Replica id (known while attached).
    pub id: Option<String>,
    /// `RW`, `WO` or `ERR` (known while attached).
    pub mode: Option<String>,
    /// Rebuild progress.
    pub rebuild: Option<RebuildView>,
    /// Requests in flight.
    pub in_flight: Option<u64>,
    /// Errors seen.
    pub errors: Option<u64>,
}

/// `zebu replica list`: the engine's view while attached, else placement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaReport {
    /// Volume id.
    pub volume: String,
    /// The engine runs (the volume is attached) and answered.
    pub live: bool,
    /// Engine control address.
    pub engine: Option<String>,
    /// Node the volume is attached to.
    pub attached_node: Option<String>,
    /// `healthy`, `degraded`, `rebuilding` or `faulted` (from the engine).
    pub state: Option<String>,
    /// Engine epoch.
    pub epoch: Option<u64>,
    /// Replicas.
    pub replicas: Vec<ReplicaView>,
    /// The engine's scrub schedule and last scrub (known while attached).
    pub scrub: Option<ScrubView>,
    /// Why the detail is missing, if it is.
    pub note: Option<String>,
}

/// A volume's scrubs as the engine reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScrubView {
    /// Time between scheduled scrubs; 0: none scheduled.
    pub interval_seconds: u64,
    /// Read rate limit per replica; 0: none.
    pub max_bytes_per_sec: u64,
    /// Next scheduled scrub (Unix seconds); 0: none planned.
    pub next_unix: i64,
    /// A scrub is running.
    pub running: bool,
    /// Scrubs finished since the engine started.
    pub runs: u64,
    /// Replicas they resynced.
    pub replicas_repaired: u64,
    /// When the last one finished (Unix seconds); 0: none yet.
    pub last_finished_unix: i64,
}

impl ScrubView {
    fn new(s: &ScrubStatus) -> ScrubView {
        ScrubView {
            interval_seconds: s.interval_seconds,
            max_bytes_per_sec: s.max_bytes_per_sec,
            next_unix: s.next_unix,
            running: s.running,
            runs: s.runs,
            replicas_repaired: s.replicas_repaired,
            last_finished_unix: s.last_finished_unix,
        }
    }

    /// One line, with times relative to `now` (Unix seconds).
    pub fn text(&self, now: i64) -> String {
        let mut out = if self.interval_seconds == 0 {
            "scrub: not scheduled".to_owned()
        } else {
            let mut s = format!("scrub: every {}", span(self.interval_seconds as i64));
            if self.max_bytes_per_sec > 0 {
                let _ = write!(
                    s,
                    " at {}/s per replica",
                    format_size(self.max_bytes_per_sec)
                );
            }
            match self.next_unix {
                0 => {}
                t if t <= now => s.push_str(", next now"),
                t => {
                    let _ = write!(s, ", next in {}", span(t - now));
                }
            }
            s
        };
        if self.running {
            out.push_str("; running now");
        } else if self.last_finished_unix > 0 {
            let _ = write!(
                out,
                "; last finished {} ago",
                span(now.saturating_sub(self.last_finished_unix))
            );
        }
        if self.replicas_repaired > 0 {
            let _ = write!(out, "; {} replica(s) repaired", self.replicas_repaired);
        }
        out.push('\n');
        out
    }
}

impl ReplicaReport {
    /// From the engine's status, with node names from the placement.
    pub fn live(volume: &VolumeView, engine: &str, st: &VolumeStatus) -> ReplicaReport {
        let node_of = |addr: &str| {
            volume
                .placement
                .iter()
                .find(|p| p.address == addr)
                .map(|p| p.node.clone())
        };
        ReplicaReport {
            volume: volume.id.clone(),
            live: true,
            engine: Some(engine.to_owned()),
            attached_node: volume.attached_node.clone(),
            state: Some(st.state.clone()),
            epoch: Some(st.epoch),
            replicas: st
                .replicas
                .iter()
                .map(|r: &ReplicaStatus| ReplicaView {
                    node: node_of(&r.address),
                    address: r.address.clone(),
                    id: Some(r.id.clone()).filter(|s| !s.is_empty()),
                    mode: Some(r.mode.clone()),
                    rebuild: r.rebuild.as_ref().and_then(RebuildView::new),
                    in_flight: Some(r.in_flight),
                    errors: Some(r.errors),
                })
                .collect(),
            scrub: st.scrub.as_ref().map(ScrubView::new),
            note: None,
        }
    }

    /// From the placement only, saying why.
    pub fn placement_only(volume: &VolumeView, note: String) -> ReplicaReport {
        ReplicaReport {
            volume: volume.id.clone(),
            live: false,
            engine: volume.engine.clone(),
            attached_node: volume.attached_node.clone(),
            state: None,
            epoch: None,
            replicas: volume
                .placement
                .iter()
                .map(|p| ReplicaView {
                    node: Some(p.node.clone()),
                    address: p.address.clone(),
                    id: None,
                    mode: None,
                    rebuild: None,
                    in_flight: None,
                    errors: None,
                })
                .collect(),
            scrub: None,
            note: Some(note),
        }
    }

    /// The human rendering.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.live {
            let _ = write!(out, "volume {}: {}", self.volume, opt(&self.state));
            if let Some(e) = self.epoch {
                let _ = write!(out, ", epoch {e}");
            }
            if let Some(n) = &self.attached_node {
                let _ = write!(out, ", attached on {n}");
            }
            if let Some(e) = &self.engine {
                let _ = write!(out, ", engine {e}");
            }
            out.push('\n');
            let mut t = Table::new(&[
                "NODE",
                "ADDRESS",
                "ID",
                "MODE",
                "REBUILD",
                "IN-FLIGHT",
                "ERRORS",
            ]);
            for r in &self.replicas {
                t.row(vec![
                    opt(&r.node),
                    r.address.clone(),
                    opt(&r.id),
                    opt(&r.mode),
                    r.rebuild
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), RebuildView::text),
                    opt(&r.in_flight),
                    opt(&r.errors),
                ]);
            }
            out.push_str(&t.render());
            if let Some(s) = &self.scrub {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                out.push_str(&s.text(now));
            }
        } else {
            if let Some(n) = &self.note {
                let _ = writeln!(out, "volume {}: {n}", self.volume);
            }
            if self.replicas.is_empty() {
                out.push_str("The driver reports no replica placement.\n");
            } else {
                let mut t = Table::new(&["NODE", "ADDRESS"]);
                for r in &self.replicas {
                    t.row(vec![opt(&r.node), r.address.clone()]);
                }
                out.push_str(&t.render());
            }
        }
        out
    }
}

/// `zebu status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusView {
    /// Endpoint dialled.
    pub endpoint: String,
    /// Plugin name.
    pub driver: String,
    /// Plugin version.
    pub version: String,
    /// Probe says ready.
    pub ready: bool,
    /// Node id, if the endpoint serves the Node service.
    pub node_id: Option<String>,
    /// Number of volumes.
    pub volumes: Option<usize>,
}

impl StatusView {
    /// The human rendering.
    pub fn text(&self) -> String {
        render_fields(&[
            ("Endpoint", self.endpoint.clone()),
            ("Driver", format!("{} {}", self.driver, self.version)),
            ("Ready", if self.ready { "yes" } else { "NO" }.to_owned()),
            ("Node", opt(&self.node_id)),
            ("Volumes", opt(&self.volumes)),
        ])
    }
}

/// Pretty JSON of a view, newline-terminated.
pub fn json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|e| {
        // Views are plain data; serialisation cannot fail. Say so if it does.
        format!("{{\"error\": {:?}}}", e.to_string())
    });
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use zebu_proto::csi::VolumeContentSource;
    use zebu_proto::csi::volume_content_source::{SnapshotSource, Type};

    #[test]
    fn sizes() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(512 << 20), "512.0 MiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(format_size((1 << 30) - 1), "1.0 GiB");
        assert_eq!(format_size(10 << 40), "10.0 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
        assert_eq!(csi_bytes(-1), 0);
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_time(1_714_566_896), "2024-05-01 12:34:56Z");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59Z");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["ID", "SIZE", "NODE"]);
        t.row(vec!["a".into(), "1.0 GiB".into(), "-".into()]);
        t.row(vec!["longer-id".into(), "5 B".into(), "node-a".into()]);
        assert_eq!(
            t.render(),
            "ID         SIZE     NODE\n\
             a          1.0 GiB  -\n\
             longer-id  5 B      node-a\n"
        );
        assert_eq!(t.len(), 2);
        assert!(Table::new(&["X"]).is_empty());
    }

    #[test]
    fn fields_align_and_continue() {
        let s = render_fields(&[("ID", "v".into()), ("Placement", "a 1\nb 2".into())]);
        assert_eq!(s, "ID:         v\nPlacement:  a 1\n            b 2\n");
    }

    #[test]
    fn placement() {
        assert_eq!(
            parse_placement("n1:127.0.0.21:9600, n2:h2:9600,"),
            vec![
                Placement {
                    node: "n1".into(),
                    address: "127.0.0.21:9600".into()
                },
                Placement {
                    node: "n2".into(),
                    address: "h2:9600".into()
                },
            ]
        );
        assert!(parse_placement("").is_empty());
    }

    fn volume() -> Volume {
        Volume {
            volume_id: "vol-1".into(),
            capacity_bytes: 1 << 30,
            volume_context: HashMap::from([
                (VOLUME_REPLICAS.to_owned(), "2".to_owned()),
                (
                    VOLUME_REPLICA_PLACEMENT.to_owned(),
                    "n1:127.0.0.21:9600,n2:127.0.0.22:9600".to_owned(),
                ),
                (VOLUME_ENGINE.to_owned(), "127.0.0.21:9500".to_owned()),
                (VOLUME_ATTACHED_NODE.to_owned(), "n1".to_owned()),
                ("csi.storage.k8s.io/fstype".to_owned(), "xfs".to_owned()),
            ]),
            content_source: Some(VolumeContentSource {
                r#type: Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: "snap-1".into(),
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn volume_view_reads_the_context() {
        let v = VolumeView::new(&volume(), &["n1".into()], None);
        assert_eq!(v.replicas, Some(2));
        assert_eq!(v.engine.as_deref(), Some("127.0.0.21:9500"));
        assert_eq!(v.placement.len(), 2);
        assert_eq!(v.source, Some(Source::Snapshot("snap-1".into())));
        assert_eq!(v.condition_text(), "-");
        assert_eq!(v.attached_text(), "n1");
        let cond = VolumeCondition {
            abnormal: true,
            message: "1 of 2 replicas faulted".into(),
        };
        let v = VolumeView::new(&volume(), &[], Some(&cond));
        assert_eq!(v.condition_text(), "ABNORMAL: 1 of 2 replicas faulted");
        let ok = VolumeCondition {
            abnormal: false,
            message: String::new(),
        };
        assert_eq!(
            VolumeView::new(&volume(), &[], Some(&ok)).condition_text(),
            "ok"
        );
        let bare = VolumeView::new(
            &Volume {
                volume_id: "v".into(),
                ..Default::default()
            },
            &[],
            None,
        );
        assert_eq!(bare.attached_text(), "-");
        assert_eq!(bare.replicas, None);
    }

    #[test]
    fn volume_list_and_details_render() {
        let ok = VolumeCondition {
            abnormal: false,
            message: String::new(),
        };
        let v = VolumeView::new(&volume(), &["n1".into()], Some(&ok));
        assert_eq!(
            volumes_table(std::slice::from_ref(&v)),
            "ID     SIZE     REPLICAS  CONDITION  ATTACHED\n\
             vol-1  1.0 GiB  2         ok         n1\n"
        );
        let snap = SnapshotView {
            id: "snap-2".into(),
            source_volume_id: "vol-1".into(),
            size_bytes: 1 << 30,
            created_unix: Some(0),
            created: Some(format_time(0)),
            ready: true,
        };
        let d = volume_details(&v, &[snap]);
        assert!(
            d.contains("Size:       1.0 GiB (1073741824 bytes)\n"),
            "{d}"
        );
        assert!(
            d.contains("Attached:   n1 (engine 127.0.0.21:9500)\n"),
            "{d}"
        );
        assert!(d.contains("Source:     snapshot snap-1\n"), "{d}");
        assert!(
            d.contains("Placement:  n1 127.0.0.21:9600\n            n2 127.0.0.22:9600\n"),
            "{d}"
        );
        assert!(
            d.contains("Context:    csi.storage.k8s.io/fstype=xfs\n"),
            "{d}"
        );
        assert!(
            d.contains("snap-2  vol-1   1.0 GiB  1970-01-01 00:00:00Z  yes"),
            "{d}"
        );
        let none = volume_details(&v, &[]);
        assert!(none.ends_with("No snapshots.\n"), "{none}");
    }

    #[test]
    fn volume_json_is_stable() {
        let v = VolumeView::new(&volume(), &[], None);
        let j: serde_json::Value = serde_json::from_str(&json(&v)).unwrap();
        assert_eq!(j["id"], "vol-1");
        assert_eq!(j["size_bytes"], 1u64 << 30);
        assert_eq!(j["replicas"], 2);
        assert_eq!(j["condition"], serde_json::Value::Null);
        assert_eq!(j["placement"][1]["node"], "n2");
        assert_eq!(j["source"]["snapshot"], "snap-1");
        assert_eq!(j["engine"], "127.0.0.21:9500");
    }

    fn engine_status() -> VolumeStatus {
        VolumeStatus {
            volume: "vol-1".into(),
            size: 1 << 30,
            state: "rebuilding".into(),
            epoch: 7,
            replicas: vec![
                ReplicaStatus {
                    address: "127.0.0.21:9600".into(),
                    id: "r1".into(),
                    mode: "RW".into(),
                    rebuild: None,
                    in_flight: 3,
                    errors: 0,
                },
                ReplicaStatus {
                    address: "127.0.0.22:9600".into(),
                    id: "r2".into(),
                    mode: "WO".into(),
                    rebuild: Some(RebuildProgress {
                        state: "running".into(),
                        bytes_done: 256 << 20,
                        bytes_total: 1 << 30,
                        rate_bytes_per_sec: (64 << 20) as f64,
                        ..Default::default()
                    }),
                    in_flight: 0,
                    errors: 2,
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn scrub_line_reads_the_schedule() {
        let mut s = ScrubView {
            interval_seconds: 7 * 86_400,
            max_bytes_per_sec: 64 << 20,
            next_unix: 1_000 + 3 * 86_400,
            running: false,
            runs: 1,
            replicas_repaired: 1,
            last_finished_unix: 1_000 - 90,
        };
        assert_eq!(
            s.text(1_000),
            "scrub: every 7d at 64.0 MiB/s per replica, next in 3d; last finished 90s ago; \
             1 replica(s) repaired\n"
        );
        s.interval_seconds = 0;
        s.running = true;
        s.replicas_repaired = 0;
        assert_eq!(s.text(1_000), "scrub: not scheduled; running now\n");
    }

    #[test]
    fn replica_report_live() {
        let v = VolumeView::new(&volume(), &[], None);
        let r = ReplicaReport::live(&v, "127.0.0.21:9500", &engine_status());
        assert_eq!(r.replicas[1].node.as_deref(), Some("n2"));
        assert_eq!(r.replicas[1].rebuild.as_ref().unwrap().percent, Some(25.0));
        assert_eq!(
            r.text(),
            "volume vol-1: rebuilding, epoch 7, attached on n1, engine 127.0.0.21:9500\n\
             NODE  ADDRESS          ID  MODE  REBUILD                                     IN-FLIGHT  ERRORS\n\
             n1    127.0.0.21:9600  r1  RW    -                                           3          0\n\
             n2    127.0.0.22:9600  r2  WO    running 256.0 MiB/1.0 GiB (25%) 64.0 MiB/s  0          2\n"
        );
        let j: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(j["live"], true);
        assert_eq!(j["replicas"][1]["mode"], "WO");
        assert_eq!(j["replicas"][1]["rebuild"]["bytes_done"], 256u64 << 20);
    }

    #[test]
    fn replica_report_detached() {
        let mut vol = volume();
        vol.volume_context.remove(VOLUME_ENGINE);
        vol.volume_context.remove(VOLUME_ATTACHED_NODE);
        let v = VolumeView::new(&vol, &[], None);
        let r = ReplicaReport::placement_only(&v, "detached".into());
        assert_eq!(
            r.text(),
            "volume vol-1: detached\n\
             NODE  ADDRESS\n\
             n1    127.0.0.21:9600\n\
             n2    127.0.0.22:9600\n"
        );
    }

    #[test]
    fn rebuild_texts() {
        let mut p = RebuildProgress {
            state: "failed".into(),
            error: "source gone".into(),
            ..Default::default()
        };
        assert_eq!(RebuildView::new(&p).unwrap().text(), "failed: source gone");
        p.state = "done".into();
        assert_eq!(RebuildView::new(&p).unwrap().text(), "done");
        p.state = "running".into();
        assert_eq!(RebuildView::new(&p).unwrap().text(), "running 0 B/0 B");
        p.state.clear();
        assert_eq!(RebuildView::new(&p), None);
    }

    #[test]
    fn status_text() {
        let s = StatusView {
            endpoint: "unix:///x".into(),
            driver: "zebu.csi.dev".into(),
            version: "0.1.0".into(),
            ready: true,
            node_id: None,
            volumes: Some(3),
        };
        assert_eq!(
            s.text(),
            "Endpoint:  unix:///x\nDriver:    zebu.csi.dev 0.1.0\nReady:     yes\nNode:      -\nVolumes:   3\n"
        );
    }
}
