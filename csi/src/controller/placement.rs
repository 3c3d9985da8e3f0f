//! Where a volume's replicas go: a pure function of the nodes' disks.
//!
//! Rules, in order of preference:
//! 1. every replica on a different node (a node loss costs one copy);
//! 2. failing that, on a different disk of a node already used;
//! 3. never two replicas of one volume on the same disk (that protects
//!    against nothing), unless the caller allows it explicitly.
//!
//! Among candidates the one with the most schedulable space wins (ties by
//! name, so placement is deterministic). A disk is schedulable for a replica
//! of `size` bytes when `allocated + size <= capacity × over_provisioning%`:
//! replicas are thin, so promising more than the raw capacity is allowed up
//! to the configured ratio, as in Longhorn.

use std::collections::{BTreeMap, HashSet};

/// One disk as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Node id.
    pub node: String,
    /// Disk path on that node.
    pub disk: String,
    /// Filesystem size in bytes.
    pub capacity_bytes: u64,
    /// Sum of the sizes of replicas already on it.
    pub allocated_bytes: u64,
}

impl DiskSpace {
    /// Bytes still schedulable with `over_provisioning_percent`.
    pub fn schedulable(&self, over_provisioning_percent: u64) -> u64 {
        let limit = (self.capacity_bytes as u128 * over_provisioning_percent as u128 / 100)
            .min(u64::MAX as u128) as u64;
        limit.saturating_sub(self.allocated_bytes)
    }
}

/// What a placement must respect.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Replicas wanted.
    pub count: usize,
    /// Size of each.
    pub size_bytes: u64,
    /// `(node, disk)` of replicas the volume already has (for replacements):
    /// their nodes and disks count as used.
    pub existing: Vec<(String, String)>,
    /// Nodes not to use at all (e.g. unreachable ones).
    pub exclude_nodes: Vec<String>,
    /// Allowed over-provisioning, in percent of capacity (100 = none).
    pub over_provisioning_percent: u64,
    /// Allow two replicas on one disk as a last resort.
    pub allow_same_disk: bool,
}

/// Why no placement exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "cannot place {wanted} replica(s) of {size_bytes} bytes: only {found} disk(s) on distinct \
     nodes or disks have room ({detail}); add nodes or disks, free space, or ask for fewer replicas"
)]
pub struct NoPlacement {
    /// Replicas asked for.
    pub wanted: usize,
    /// Replicas that could be placed.
    pub found: usize,
    /// Size of each.
    pub size_bytes: u64,
    /// Schedulable space per disk, for the message.
    pub detail: String,
}

/// Picks `req.count` `(node, disk)` pairs, or explains why it cannot.
pub fn place(disks: &[DiskSpace], req: &Request) -> Result<Vec<(String, String)>, NoPlacement> {
    let op = req.over_provisioning_percent.max(1);
    let excluded: HashSet<&str> = req.exclude_nodes.iter().map(String::as_str).collect();
    // Remaining schedulable space per (node, disk); updated as we place.
    let mut space: BTreeMap<(String, String), u64> = disks
        .iter()
        .filter(|d| !excluded.contains(d.node.as_str()))
        .map(|d| ((d.node.clone(), d.disk.clone()), d.schedulable(op)))
        .collect();
    let mut used_nodes: HashSet<String> = req.existing.iter().map(|(n, _)| n.clone()).collect();
    let mut used_disks: HashSet<(String, String)> = req.existing.iter().cloned().collect();
    let mut out = Vec::new();
    let fits = |free: u64| free >= req.size_bytes;
    for pass in 0..3 {
        while out.len() < req.count {
            let best = space
                .iter()
                .filter(|(k, free)| {
                    fits(**free)
                        && match pass {
                            0 => !used_nodes.contains(&k.0),
                            1 => !used_disks.contains(*k),
                            _ => req.allow_same_disk,
                        }
                })
                // Most space first; BTreeMap order breaks ties by name.
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(k, _)| k.clone());
            let Some(k) = best else { break };
            if let Some(free) = space.get_mut(&k) {
                *free -= req.size_bytes;
            }
            used_nodes.insert(k.0.clone());
            used_disks.insert(k.clone());
            out.push(k);
        }
    }
    if out.len() < req.count {
        let detail = disks
            .iter()
            .map(|d| format!("{}:{} {} free", d.node, d.disk, d.schedulable(op)))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(NoPlacement {
            wanted: req.count,
            found: out.len(),
            size_bytes: req.size_bytes,
            detail: if detail.is_empty() {
                "no node has registered".to_owned()
            } else {
                detail
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn disk(node: &str, disk: &str, cap: u64, alloc: u64) -> DiskSpace {
        DiskSpace {
            node: node.into(),
            disk: disk.into(),
            capacity_bytes: cap,
            allocated_bytes: alloc,
        }
    }

    fn req(count: usize, size: u64) -> Request {
        Request {
            count,
            size_bytes: size,
            over_provisioning_percent: 100,
            ..Default::default()
        }
    }

    #[test]
    fn distinct_nodes_first() {
        let d = [
            disk("n1", "/a", 10 * G, 0),
            disk("n1", "/b", 10 * G, 0),
            disk("n2", "/a", 10 * G, 0),
            disk("n3", "/a", 10 * G, 0),
        ];
        let p = place(&d, &req(3, G)).unwrap();
        let nodes: HashSet<_> = p.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes.len(), 3, "{p:?}");
    }

    #[test]
    fn falls_back_to_distinct_disks_never_the_same_disk() {
        let d = [disk("n1", "/a", 10 * G, 0), disk("n1", "/b", 10 * G, 0)];
        let p = place(&d, &req(2, G)).unwrap();
        assert_ne!(p[0], p[1]);
        let e = place(&d, &req(3, G)).unwrap_err();
        assert_eq!((e.wanted, e.found), (3, 2));
        assert!(e.to_string().contains("n1:/a"), "{e}");
        let mut r = req(3, G);
        r.allow_same_disk = true;
        assert_eq!(place(&d, &r).unwrap().len(), 3);
    }

    #[test]
    fn respects_space_and_prefers_the_emptiest() {
        let d = [
            disk("n1", "/a", 10 * G, 9 * G),
            disk("n2", "/a", 10 * G, 2 * G),
            disk("n3", "/a", 10 * G, 5 * G),
        ];
        let p = place(&d, &req(2, 2 * G)).unwrap();
        assert_eq!(
            p,
            vec![("n2".into(), "/a".into()), ("n3".into(), "/a".into())]
        );
        assert!(place(&d, &req(3, 2 * G)).is_err(), "n1 has only 1 GiB left");
        let mut r = req(3, 2 * G);
        r.over_provisioning_percent = 200;
        assert_eq!(place(&d, &r).unwrap().len(), 3);
    }

    #[test]
    fn replacements_avoid_existing_nodes_and_excluded_ones() {
        let d = [
            disk("n1", "/a", 10 * G, 0),
            disk("n2", "/a", 10 * G, 0),
            disk("n3", "/a", 10 * G, 0),
            disk("n4", "/a", 10 * G, 0),
        ];
        let mut r = req(1, G);
        r.existing = vec![("n1".into(), "/a".into()), ("n2".into(), "/a".into())];
        r.exclude_nodes = vec!["n3".into()];
        assert_eq!(place(&d, &r).unwrap(), vec![("n4".into(), "/a".into())]);
    }

    #[test]
    fn empty_cluster_says_so() {
        let e = place(&[], &req(1, G)).unwrap_err();
        assert!(e.to_string().contains("no node has registered"));
    }
}
