//! The supervisor: one task per known process that waits for it to exit and
//! restarts it, until told to stop it ([`Cmd::Stop`]) or to let go of it
//! ([`Cmd::Detach`]).
//!
//! Invariants:
//! - Only the supervisor touches a supervised process (signals, `wait`);
//!   everyone else sends it a command and awaits its task.
//! - An intentional stop never restarts; an unexpected exit always does,
//!   after a backoff of 200 ms doubling up to 10 s, reset after a run longer
//!   than 30 s.
//! - Our own children are reaped with `Child::wait`; adopted processes (not
//!   our children) are polled every 500 ms through `/proc` ([`is_ours`]).
//! - A start abandoned by a command kills the half-started child, so no
//!   process runs without its pid in the record.

use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::process::{self, Ready, STOP_GRACE, is_ours};
use super::record::{Proc, Spec};
use super::{AgentError, Ctx};
use zebu_common::supervise::describe_exit;

/// First restart delay.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest restart delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run longer than this resets the backoff.
pub(crate) const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// Poll period of an adopted process.
pub(crate) const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// What the supervisor should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// Keep it running.
    Run,
    /// Stop it (SIGTERM, SIGKILL after a grace period) and end.
    Stop,
    /// End, leaving it running (agent shutdown).
    Detach,
}

/// What the supervisor starts from.
pub(crate) enum Initial {
    /// Our running child.
    Child(Child),
    /// A running process an earlier agent started.
    Adopted(u32),
    /// Nothing runs: start it after this delay.
    Restart(Duration),
}

/// Waits for a command other than [`Cmd::Run`]; a dropped sender (the agent
/// is gone) means [`Cmd::Detach`].
pub(crate) async fn next_cmd(rx: &mut watch::Receiver<Cmd>) -> Cmd {
    loop {
        let c = *rx.borrow_and_update();
        if c != Cmd::Run {
            return c;
        }
        if rx.changed().await.is_err() {
            return Cmd::Detach;
        }
    }
}

/// Records a ready run in `proc` (pid, address, what the ready line says).
pub(crate) fn record_ready(proc: &Proc, pid: u32, ready: &Ready) {
    proc.update(|s| {
        s.running = true;
        s.rec.pid = Some(pid);
        match (ready, &mut s.rec.spec) {
            (
                Ready::Replica {
                    address,
                    size_bytes,
                },
                Spec::Replica {
                    size_bytes: size,
                    created,
                    ..
                },
            ) => {
                s.rec.address = address.clone();
                *size = *size_bytes;
                *created = true;
            }
            (Ready::Engine { control, epoch }, Spec::Engine { .. }) => {
                s.rec.address = control.clone();
                s.rec.epoch = *epoch;
            }
            // Cannot happen: the ready line is parsed by the record's kind.
            _ => {}
        }
    });
}

/// Records that nothing runs any more and why.
fn record_down(proc: &Proc, why: String) {
    proc.update(|s| {
        s.running = false;
        s.rec.pid = None;
        s.rec.address.clear();
        s.rec.last_exit = why;
    });
}

async fn persist(proc: &Arc<Proc>, what: &str) {
    if let Err(e) = proc.persist().await {
        error!(%what, error = %e, "cannot write the process record");
    }
}

/// Starts the process described by `proc`'s record: spawns it, records the
/// pid before waiting (so a crash of the agent meanwhile leaves a record of
/// it), waits for its ready line, records it. `cancel` abandons the start
/// (the child is killed). Counts a restart when `restart` is set.
pub(crate) async fn start(
    ctx: &Ctx,
    proc: &Arc<Proc>,
    restart: bool,
    cancel: impl Future<Output = ()>,
) -> Result<Child, AgentError> {
    let snap = proc.snapshot();
    let what = snap.rec.spec.what();
    let program = ctx.program(proc.key.kind)?;
    let args = snap.rec.spec.args(&ctx.cfg.listen_host);
    let spawned = process::spawn(proc.key.kind, &what, &program, &args, &proc.log)?;
    let pid = spawned.pid;
    proc.update(|s| {
        s.running = false;
        s.rec.program = program.clone();
        s.rec.args = args.clone();
        s.rec.pid = Some(pid);
        s.rec.address.clear();
        if restart {
            s.rec.restarts = s.rec.restarts.saturating_add(1);
        }
    });
    persist(proc, &what).await;
    match spawned.wait_ready(process::READY_TIMEOUT, cancel).await {
        Ok(l) => {
            record_ready(proc, l.pid, &l.ready);
            persist(proc, &what).await;
            Ok(l.child)
        }
        Err(e) => {
            record_down(proc, e.to_string());
            persist(proc, &what).await;
            Err(e)
        }
    }
}

/// The supervisor task of `proc`.
pub(crate) async fn supervise(
    ctx: Arc<Ctx>,
    proc: Arc<Proc>,
    initial: Initial,
    mut cmd: watch::Receiver<Cmd>,
) {
    let what = proc.snapshot().rec.spec.what();
    let mut backoff = BACKOFF_START;
    let mut current = initial;
    let mut started = Instant::now();
    loop {
        // Wait for the run to end, or for a command.
        let delay = match current {
            Initial::Child(mut child) => {
                let pid = proc.snapshot().rec.pid.unwrap_or(0);
                let exit = tokio::select! {
                    st = child.wait() => match st {
                        Ok(st) => describe_exit(st),
                        Err(e) => format!("unknown (waiting failed: {e})"),
                    },
                    c = next_cmd(&mut cmd) => {
                        if c == Cmd::Stop {
                            let how = process::stop_child(&mut child, pid, STOP_GRACE).await;
                            info!(%what, pid, %how, "stopped");
                            record_down(&proc, format!("stopped by the agent ({how})"));
                            persist(&proc, &what).await;
                        }
                        return;
                    }
                };
                exited(&proc, &what, exit, started, &mut backoff).await
            }
            Initial::Adopted(pid) => {
                let snap = proc.snapshot();
                let (program, args) = (snap.rec.program, snap.rec.args);
                let exit = loop {
                    tokio::select! {
                        _ = tokio::time::sleep(ADOPTED_POLL) => {
                            if !is_ours(pid, &program, &args) {
                                break "exited (status unknown: adopted, not a child of this agent)".to_owned();
                            }
                        }
                        c = next_cmd(&mut cmd) => {
                            if c == Cmd::Stop {
                                let how = process::stop_adopted(pid, &program, &args, STOP_GRACE).await;
                                info!(%what, pid, %how, "stopped");
                                record_down(&proc, format!("stopped by the agent ({how})"));
                                persist(&proc, &what).await;
                            }
                            return;
                        }
                    }
                };
                exited(&proc, &what, exit, started, &mut backoff).await
            }
            Initial::Restart(delay) => delay,
        };

        // Restart, retrying with backoff, until it is ready or a command comes.
        let mut delay = delay;
        current = loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = next_cmd(&mut cmd) => return,
            }
            let cancel = async {
                next_cmd(&mut cmd).await;
            };
            match start(&ctx, &proc, true, cancel).await {
                Ok(child) => {
                    let s = proc.snapshot();
                    info!(
                        %what,
                        pid = s.rec.pid.unwrap_or(0),
                        address = %s.rec.address,
                        restarts = s.rec.restarts,
                        "restarted"
                    );
                    started = Instant::now();
                    break Initial::Child(child);
                }
                Err(AgentError::Cancelled(_)) => return,
                Err(e) => {
                    delay = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    error!(%what, error = %e, retry_in = ?delay, "restart failed");
                }
            }
        };
    }
}

/// Records an unexpected exit; returns the delay before restarting.
async fn exited(
    proc: &Arc<Proc>,
    what: &str,
    exit: String,
    started: Instant,
    backoff: &mut Duration,
) -> Duration {
    if started.elapsed() > BACKOFF_RESET_AFTER {
        *backoff = BACKOFF_START;
    }
    let delay = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    warn!(%what, %exit, restart_in = ?delay, "exited unexpectedly");
    record_down(proc, exit);
    persist(proc, what).await;
    delay
}
