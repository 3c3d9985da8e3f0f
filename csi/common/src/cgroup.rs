//! A home outside the node plugin's container for the processes that carry
//! attached volumes' I/O (replicas, engines, the FUSE bridge), so that
//! deleting or upgrading the node plugin's Pod does not take them down.
//!
//! The container runtime stops a container by killing every process in
//! the container's cgroup. A child moved to another cgroup in *every*
//! hierarchy it belongs to is no longer found there; with the Pod in the
//! host's pid namespace (`hostPID`), the plugin's own exit does not kill it
//! either. The next plugin adopts it from the agent's records.
//!
//! Invariants:
//! - [`init`] runs at most once, at start-up, before any child is spawned;
//!   until then (and when never called, as outside Kubernetes) [`place`]
//!   does nothing: children stay where the parent is, as plain processes.
//! - A child is placed right after it is spawned, before it is reported
//!   ready; a failure to place it is an error of the spawn (a volume whose
//!   engine would die with the plugin must not be reported attached).
//! - The home is the same path in every hierarchy (cgroup v1 controllers,
//!   named hierarchies, and the v2 unified one), under the hierarchy roots
//!   found at `root` (the host's `/sys/fs/cgroup` mounted in the container).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Errors of preparing the home or placing a process in it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` could not be read or parsed.
    #[error("reading this process's cgroups (/proc/self/cgroup): {0}")]
    Own(String),
    /// A hierarchy this process belongs to is not mounted under the root.
    #[error(
        "cgroup hierarchy `{hierarchy}` is not mounted under {root} (mount the host's \
         /sys/fs/cgroup there, e.g. as a hostPath volume)"
    )]
    NotMounted {
        /// The hierarchy, as `/proc/self/cgroup` names it.
        hierarchy: String,
        /// The root searched.
        root: String,
    },
    /// A file of the cgroup filesystem could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// [`init`] was called twice.
    #[error("the data-path cgroup was already set up")]
    AlreadySet,
}

/// The cgroup (one directory per hierarchy) children are moved into.
#[derive(Debug)]
pub struct Home {
    /// `cgroup.procs` of the home in each hierarchy.
    procs: Vec<PathBuf>,
}

static HOME: OnceLock<Home> = OnceLock::new();

/// Sets up the home `name` (a relative cgroup path such as `zebu`) under
/// every hierarchy of this process, found below `root`; from then on
/// [`place`] moves children there.
pub fn init(root: &Path, name: &str) -> Result<(), CgroupError> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| CgroupError::Own(e.to_string()))?;
    let home = Home::prepare(root, name, &own)?;
    HOME.set(home).map_err(|_| CgroupError::AlreadySet)
}

/// Moves process `pid` into the home, if [`init`] set one up.
pub fn place(pid: u32) -> Result<(), CgroupError> {
    match HOME.get() {
        Some(home) => home.place(pid),
        None => Ok(()),
    }
}

impl Home {
    /// The home `name` below `root` for the hierarchies listed in `own`
    /// (the text of `/proc/self/cgroup`), created where missing.
    fn prepare(root: &Path, name: &str, own: &str) -> Result<Home, CgroupError> {
        let io = |what, path: &Path| {
            let path = path.display().to_string();
            move |source| CgroupError::Io { what, path, source }
        };
        let mut procs = Vec::new();
        for line in own.lines().filter(|l| !l.trim().is_empty()) {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers) = match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(c), Some(_path)) => (id, c),
                _ => return Err(CgroupError::Own(format!("unexpected line {line:?}"))),
            };
            let dir = hierarchy_dir(root, controllers).ok_or_else(|| CgroupError::NotMounted {
                hierarchy: if controllers.is_empty() {
                    "unified (cgroup v2)".to_owned()
                } else {
                    controllers.to_owned()
                },
                root: root.display().to_string(),
            })?;
            let home = dir.join(name);
            std::fs::create_dir_all(&home).map_err(io("creating", &home))?;
            if controllers.split(',').any(|c| c == "cpuset") {
                // A new v1 cpuset admits no process until it has CPUs and
                // memory nodes: give it all of its parent's.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let mine = home.join(file);
                    let now = std::fs::read_to_string(&mine).map_err(io("reading", &mine))?;
                    if now.trim().is_empty() {
                        let parent = home.parent().unwrap_or(&dir).join(file);
                        let all =
                            std::fs::read_to_string(&parent).map_err(io("reading", &parent))?;
                        std::fs::write(&mine, all.trim()).map_err(io("writing", &mine))?;
                    }
                }
            }
            procs.push(home.join("cgroup.procs"));
        }
        if procs.is_empty() {
            return Err(CgroupError::Own("it lists no hierarchy".into()));
        }
        Ok(Home { procs })
    }

    fn place(&self, pid: u32) -> Result<(), CgroupError> {
        for p in &self.procs {
            std::fs::write(p, pid.to_string()).map_err(|source| CgroupError::Io {
                what: "moving a process into",
                path: p.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Where the hierarchy of `controllers` (as `/proc/self/cgroup` names it:
/// `cpu,cpuacct`, `name=systemd`, or empty for v2) is mounted below `root`.
fn hierarchy_dir(root: &Path, controllers: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = if controllers.is_empty() {
        // v2: the unified hierarchy beside v1 ones (hybrid), or the root.
        vec![root.join("unified"), root.to_owned()]
    } else if let Some(named) = controllers.strip_prefix("name=") {
        vec![root.join(named), root.join(controllers)]
    } else {
        let mut c = vec![root.join(controllers)];
        c.extend(controllers.split(',').map(|one| root.join(one)));
        c
    };
    candidates.into_iter().find(|d| {
        d.join("cgroup.procs").is_file()
            && (!controllers.is_empty() || d.join("cgroup.controllers").is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup tree: `hierarchies` are directories with a
    /// `cgroup.procs`; `v2` ones also have `cgroup.controllers`.
    fn tree(v1: &[&str], v2: Option<&str>) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for h in v1 {
            let d = t.path().join(h);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("procs");
            if h.contains("cpuset") {
                std::fs::write(d.join("cpuset.cpus"), "0-1\n").expect("cpus");
                std::fs::write(d.join("cpuset.mems"), "0\n").expect("mems");
            }
        }
        if let Some(h) = v2 {
            let d = t.path().join(h);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("cgroup.procs"), "").expect("procs");
            std::fs::write(d.join("cgroup.controllers"), "").expect("controllers");
        }
        t
    }

    #[test]
    fn a_hybrid_host_gets_a_home_in_every_hierarchy() {
        let t = tree(
            &["cpu", "cpuacct", "cpuset", "memory", "systemd"],
            Some("unified"),
        );
        // The kernel would give a new cpuset these files, empty.
        let cs = t.path().join("cpuset/zebu");
        std::fs::create_dir_all(&cs).expect("mkdir");
        std::fs::write(cs.join("cpuset.cpus"), "").expect("cpus");
        std::fs::write(cs.join("cpuset.mems"), "").expect("mems");
        let own = "9:name=systemd:/kubepods/x\n4:memory:/kubepods/x\n3:cpuset:/kubepods/x\n\
                   2:cpuacct:/\n1:cpu:/\n0::/\n";
        let home = Home::prepare(t.path(), "zebu", own).expect("prepare");
        let mut got: Vec<String> = home
            .procs
            .iter()
            .map(|p| {
                p.strip_prefix(t.path())
                    .expect("below root")
                    .display()
                    .to_string()
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "cpu/zebu/cgroup.procs",
                "cpuacct/zebu/cgroup.procs",
                "cpuset/zebu/cgroup.procs",
                "memory/zebu/cgroup.procs",
                "systemd/zebu/cgroup.procs",
                "unified/zebu/cgroup.procs",
            ]
        );
        let cpus = std::fs::read_to_string(t.path().join("cpuset/zebu/cpuset.cpus")).expect("cpus");
        assert_eq!(cpus, "0-1", "the new cpuset got its parent's CPUs");
        home.place(4242).expect("place");
        let moved = std::fs::read_to_string(t.path().join("memory/zebu/cgroup.procs")).expect("r");
        assert_eq!(moved, "4242");
    }

    #[test]
    fn joined_controllers_and_pure_v2_are_found() {
        let t = tree(&["cpu,cpuacct"], None);
        let home = Home::prepare(t.path(), "zebu", "1:cpu,cpuacct:/\n").expect("joined");
        assert!(home.procs[0].ends_with("cpu,cpuacct/zebu/cgroup.procs"));
        let t = tree(&[], Some(""));
        let home = Home::prepare(t.path(), "zebu", "0::/kubepods/x\n").expect("v2");
        assert_eq!(home.procs, [t.path().join("zebu/cgroup.procs")]);
    }

    #[test]
    fn a_hierarchy_missing_under_the_root_is_a_clear_error() {
        let t = tree(&["cpu"], None);
        let err = Home::prepare(t.path(), "zebu", "1:cpu:/\n4:memory:/\n").unwrap_err();
        assert!(err.to_string().contains("`memory` is not mounted"), "{err}");
    }
}
