//! A small network of hosts for fault tests: each host is a network
//! namespace with one interface (`eth0`, 10.77.0.10+i/24) on a bridge in a
//! switch namespace of its own, so the host's network is never touched and
//! nothing can leave the machine. Faults are made with the kernel's own
//! tools on a host's interface: the link cut (`ip link set down`), slowed
//! (`tc` `tbf`), or made lossy in one direction or both (nftables, a random
//! share of TCP packets dropped). Processes run in a host with
//! [`Lab::command`] (`nsenter --net`, which keeps the mount namespace).
//!
//! Cleanup: dropping the [`Lab`] deletes its namespaces; declare it before
//! the processes that run in it, so they are gone first.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{SHORT, run};

/// Which way a loss applies, seen from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Packets the host receives.
    In,
    /// Packets the host sends.
    Out,
    /// Both.
    Both,
}

/// The namespaces of one test.
pub struct Lab {
    switch: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args), SHORT).expect_ok();
}

impl Lab {
    /// `n` hosts on one bridge.
    pub fn new(n: usize) -> Lab {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "zt{}n{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}s");
        let mut lab = Lab {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..n {
            let host = format!("{prefix}h{i}");
            ip(&["netns", "add", &host]);
            lab.hosts.push(host.clone());
            let (a, b) = (format!("{host}a"), format!("{host}b"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip(&["link", "set", &a, "netns", &host]);
            ip(&["link", "set", &b, "netns", &switch]);
            ip(&["-n", &host, "link", "set", &a, "name", "eth0"]);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{}/24", Self::ip_of(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            ip(&["-n", &host, "link", "set", "lo", "up"]);
            ip(&["-n", &switch, "link", "set", &b, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &b, "up"]);
        }
        lab
    }

    fn ip_of(i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        Self::ip_of(i)
    }

    /// Host `i`'s namespace.
    pub fn netns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// `program` run in host `i`.
    pub fn command(&self, i: usize, program: &Path) -> Command {
        in_netns(Some(&self.hosts[i]), program)
    }

    /// Takes host `i`'s link down: nothing in or out.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hosts[i], "link", "set", "eth0", "down"]);
    }

    /// Brings host `i`'s link back, at full speed and without loss.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.hosts[i], "link", "set", "eth0", "up"]);
        let port = format!("{}b", self.hosts[i]);
        for (ns, dev) in [
            (self.hosts[i].as_str(), "eth0"),
            (self.switch.as_str(), port.as_str()),
        ] {
            let _ = run(
                Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", dev, "root"]),
                SHORT,
            );
        }
        self.nft(i, "delete table inet zebu_fault");
    }

    /// Limits host `i`'s link to `kbit` kilobits per second both ways (a
    /// token bucket on each end: what does not fit waits in the queue).
    pub fn slow(&self, i: usize, kbit: u32) {
        let rate = format!("{kbit}kbit");
        let port = format!("{}b", self.hosts[i]);
        for (ns, dev) in [
            (self.hosts[i].as_str(), "eth0"),
            (self.switch.as_str(), port.as_str()),
        ] {
            run(
                Command::new("tc").args([
                    "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate,
                    "burst", "1600", "latency", "10s",
                ]),
                SHORT,
            )
            .expect_ok();
        }
    }

    /// Drops `percent` of host `i`'s TCP packets, `way`.
    pub fn lose(&self, i: usize, way: Way, percent: u32) {
        self.nft(i, "delete table inet zebu_fault");
        let mut rules = String::from("table inet zebu_fault {\n");
        for (hook, applies) in [("input", way != Way::Out), ("output", way != Way::In)] {
            let pick = if percent >= 100 {
                String::new()
            } else {
                format!("numgen random mod 100 < {percent} ")
            };
            if applies {
                rules.push_str(&format!(
                    "  chain {hook} {{ type filter hook {hook} priority 0; \
                     meta l4proto tcp {pick}drop; }}\n"
                ));
            }
        }
        rules.push_str("}\n");
        let file = std::env::temp_dir().join(format!("{}-nft.rules", self.hosts[i]));
        std::fs::write(&file, rules).expect("write nft rules");
        let r = run(
            in_netns(Some(&self.hosts[i]), Path::new("nft"))
                .arg("-f")
                .arg(&file),
            SHORT,
        );
        let _ = std::fs::remove_file(&file);
        r.expect_ok();
    }

    /// Runs one nft command in host `i`, ignoring failure (a table that is
    /// not there).
    fn nft(&self, i: usize, cmd: &str) {
        let mut c = in_netns(Some(&self.hosts[i]), Path::new("nft"));
        c.args(cmd.split_whitespace());
        let _ = run(&mut c, SHORT);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = run(Command::new("ip").args(["netns", "del", ns]), SHORT);
        }
        // Deleting a namespace frees its interfaces asynchronously.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `program`, run in network namespace `netns` when given.
pub fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
            c
        }
        None => Command::new(program),
    }
}
