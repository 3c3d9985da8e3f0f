//! The FUSE server that serves the export as a file: `nbdfuse` or Zebu's
//! bridge `zebu-nbd-fuse`, started in its own process group so it outlives
//! the node plugin, waited for until it serves, and stopped (only when it
//! is ours: its command line names the file).

use super::*;

/// Name of the bridge executable ([`Backend::Bridge`]).
pub const BRIDGE_BINARY: &str = "zebu-nbd-fuse";

/// Where [`Backend::Bridge`] finds `zebu-nbd-fuse`: next to `exe` (the
/// running executable), in `exe`'s grandparent directory when `exe` is in
/// cargo's `deps/` (test binaries), else in a directory of `path` (`$PATH`).
pub(super) fn find_bridge_binary(exe: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        dirs.push(dir.to_owned());
        if dir.file_name() == Some(OsStr::new("deps"))
            && let Some(up) = dir.parent()
        {
            dirs.push(up.to_owned());
        }
    }
    if let Some(path) = path {
        dirs.extend(std::env::split_paths(path));
    }
    dirs.into_iter()
        .map(|d| d.join(BRIDGE_BINARY))
        .find(|p| is_exec(p))
}

pub(super) fn bridge_binary(ctx: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ok();
    let path = std::env::var_os("PATH");
    find_bridge_binary(exe.as_deref(), path.as_deref()).ok_or_else(|| {
        precondition(
            ctx,
            format!(
                "the {BRIDGE_BINARY} executable was found neither next to {} nor on PATH; \
                 install it alongside zebu-csi",
                exe.as_deref()
                    .map(|e| e.display().to_string())
                    .unwrap_or_else(|| "the running executable".into())
            ),
        )
    })
}

/// The export size through the bridge's NBD client (no libnbd needed).
pub(super) async fn bridge_export_size(nbd_uri: &str, ctx: &str) -> Result<u64> {
    let uri: zebu_nbd_fuse::nbd_client::NbdUri = nbd_uri
        .parse()
        .map_err(|e| precondition(ctx, format!("{e}")))?;
    zebu_nbd_fuse::nbd_client::probe(&uri)
        .await
        .map(|info| info.size)
        .map_err(|e| precondition(ctx, format!("querying the export size: {e}")))
}

/// Starts the FUSE server (`program`: nbdfuse or zebu-nbd-fuse) and waits
/// until it serves the export; records the pid. Returns an [`Attached`]
/// without a device yet.
pub(super) async fn start_server(
    layout: &Layout,
    backend: Backend,
    program: &Path,
    nbd_uri: &str,
    expected: u64,
    ctx: &str,
) -> Result<Attached> {
    // A stale pid file would make us think the new nbdfuse is ready.
    match std::fs::remove_file(&layout.pidfile) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(ctx)(e)),
    }
    let log = std::fs::File::create(&layout.log).map_err(io_err(ctx))?;
    let log2 = log.try_clone().map_err(io_err(ctx))?;
    let args: Vec<OsString> = match backend {
        Backend::Bridge => vec![
            "--uri".into(),
            nbd_uri.into(),
            "--file".into(),
            layout.backing.clone().into(),
            "--pidfile".into(),
            layout.pidfile.clone().into(),
        ],
        _ => vec![
            "-P".into(),
            layout.pidfile.clone().into(),
            layout.backing.clone().into(),
            nbd_uri.into(),
        ],
    };
    let command = command_line(&program.to_string_lossy(), &args);
    // nbdfuse 1.14 and zebu-nbd-fuse stay in the foreground; they write the
    // pid file once they serve. Its own process group keeps terminal/group
    // signals aimed at the plugin away from it: it must outlive the plugin
    // (see module docs).
    let mut child = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|source| AttachError::Spawn {
            context: ctx.to_owned(),
            command: command.clone(),
            source,
        })?;
    let child_pid = child.id().and_then(|p| i32::try_from(p).ok());

    let mut rec = StateRecord {
        version: STATE_VERSION,
        nbd_uri: nbd_uri.to_owned(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: child_pid,
        device: None,
        size_bytes: expected,
        backend,
    };
    // Out of the plugin's container, when it runs in one (see
    // zebu_common::cgroup): the mount must outlive the plugin's Pod.
    let placed = match child_pid {
        Some(pid) => zebu_common::cgroup::place(pid as u32).map_err(|source| AttachError::Cgroup {
            context: ctx.to_owned(),
            source,
        }),
        None => Ok(()),
    };
    let ready = match placed.and_then(|()| write_state(layout, &rec, ctx)) {
        Ok(()) => wait_nbdfuse_ready(&mut child, layout, expected, &command, ctx).await,
        Err(e) => Err(e),
    };
    let (pid, exited_ok) = match ready {
        Ok(v) => v,
        Err(e) => {
            // Our own child (not a pid read from a file): safe to kill. The
            // caller's cleanup() then removes a FUSE mount it may have made.
            let _ = child.start_kill();
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, child.wait()).await;
            return Err(e);
        }
    };
    if !exited_ok {
        // Reap nbdfuse when it exits (after detach) and log it.
        let uri = nbd_uri.to_owned();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => info!(%uri, %status, "FUSE server exited"),
                Err(e) => warn!(%uri, "waiting for the FUSE server: {e}"),
            }
        });
    }
    rec.nbdfuse_pid = Some(pid);
    write_state(layout, &rec, ctx)?;
    Ok(Attached {
        nbd_uri: nbd_uri.to_owned(),
        device: PathBuf::new(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: Some(pid),
        size_bytes: expected,
        backend,
    })
}

/// [`Backend::Engine`]: bind-mounts the directory of the engine's file
/// (`file`, named like `STATE_DIR/fuse/disk`) onto `STATE_DIR/fuse` and
/// checks (one `stat`, bounded by [`COMMAND_TIMEOUT`]) that the file shows
/// at least the export's size. Records the attachment
/// before the mount, so a failure is cleaned up. Returns an [`Attached`]
/// without a device yet.
pub(super) async fn bind_engine_file(
    layout: &Layout,
    file: &Path,
    nbd_uri: &str,
    expected: u64,
    ctx: &str,
) -> Result<Attached> {
    if file.file_name() != layout.backing.file_name() {
        return Err(precondition(
            ctx,
            format!(
                "the engine's file {} is not named {:?}",
                file.display(),
                layout.backing.file_name().unwrap_or_default()
            ),
        ));
    }
    let dir = file
        .parent()
        .filter(|d| d.is_absolute())
        .ok_or_else(|| precondition(ctx, format!("{}: not an absolute path", file.display())))?
        .to_owned();
    let rec = StateRecord {
        version: STATE_VERSION,
        nbd_uri: nbd_uri.to_owned(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: None,
        device: None,
        size_bytes: expected,
        backend: Backend::Engine,
    };
    write_state(layout, &rec, ctx)?;
    let (from, to) = (dir.clone(), layout.fuse_dir.clone());
    let c = format!("{ctx}: bind-mounting {} at {}", dir.display(), to.display());
    blocking(ctx, move || {
        nix::mount::mount(
            Some(&from),
            &to,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err(&c))
    })
    .await?;
    // The engine answers at once: its file exists as soon as it is ready.
    let shown =
        match tokio::time::timeout(COMMAND_TIMEOUT, tokio::fs::metadata(&layout.backing)).await {
            Ok(Ok(m)) => m.len(),
            Ok(Err(e)) => {
                return Err(precondition(
                    ctx,
                    format!("the engine's file {}: {e}", file.display()),
                ));
            }
            Err(_) => {
                return Err(AttachError::NotReady {
                    context: ctx.to_owned(),
                    what: format!("the engine to answer for {}", file.display()),
                    timeout: COMMAND_TIMEOUT,
                });
            }
        };
    if shown < expected {
        return Err(precondition(
            ctx,
            format!(
                "the engine's file {} shows {shown} bytes, its export {expected}",
                file.display()
            ),
        ));
    }
    Ok(Attached {
        nbd_uri: nbd_uri.to_owned(),
        device: PathBuf::new(),
        fuse_dir: layout.fuse_dir.clone(),
        backing_file: layout.backing.clone(),
        nbdfuse_pid: None,
        size_bytes: shown,
        backend: Backend::Engine,
    })
}

/// Polls until nbdfuse has written its pid file and serves a file of the
/// export's size. Returns the pid from the pid file and whether the started
/// process already exited successfully (a daemonizing nbdfuse).
pub(super) async fn wait_nbdfuse_ready(
    child: &mut tokio::process::Child,
    layout: &Layout,
    expected: u64,
    command: &str,
    ctx: &str,
) -> Result<(i32, bool)> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut delay = Duration::from_millis(5);
    let mut exited_ok = false;
    let mut last_size = None;
    loop {
        if !exited_ok {
            match child.try_wait() {
                Ok(None) => {}
                // Exit 0 with a pid file: a daemonizing nbdfuse; keep polling.
                Ok(Some(status)) if status.success() => exited_ok = true,
                Ok(Some(status)) => {
                    let log = std::fs::read_to_string(&layout.log).unwrap_or_default();
                    return Err(AttachError::Command {
                        context: ctx.to_owned(),
                        command: command.to_owned(),
                        status: status.to_string(),
                        stderr: log.trim().to_owned(),
                    });
                }
                Err(e) => return Err(io_err(ctx)(e)),
            }
        }
        let pid = std::fs::read_to_string(&layout.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            // Ready; the FUSE file is served now (stat goes through FUSE).
            match tokio::fs::metadata(&layout.backing).await {
                Ok(m) if m.len() == expected => return Ok((pid, exited_ok)),
                Ok(m) => last_size = Some(m.len()),
                Err(e) => debug!("stat {}: {e}", layout.backing.display()),
            }
        } else if exited_ok {
            let log = std::fs::read_to_string(&layout.log).unwrap_or_default();
            return Err(precondition(
                ctx,
                format!(
                    "`{command}` exited without writing its pid file: {}",
                    log.trim()
                ),
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            let what = match last_size {
                Some(s) => format!(
                    "{} to be {expected} bytes (the FUSE server shows {s})",
                    layout.backing.display()
                ),
                None => format!("the FUSE server to serve {}", layout.backing.display()),
            };
            return Err(AttachError::NotReady {
                context: ctx.to_owned(),
                what,
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

pub(super) async fn stop_nbdfuse(pid: i32, backing: &Path, ctx: &str) -> Result<()> {
    let gone = || !is_our_server(pid, backing);
    if wait_until(RELEASE_TIMEOUT / 3, gone).await {
        return Ok(());
    }
    for (sig, wait) in [
        (Signal::SIGTERM, RELEASE_TIMEOUT / 3),
        (Signal::SIGKILL, RELEASE_TIMEOUT / 3),
    ] {
        if gone() {
            return Ok(());
        }
        warn!(
            pid,
            "FUSE server still running after unmount; sending {sig}"
        );
        match kill(Pid::from_raw(pid), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => return Err(sys_err(&format!("{ctx}: kill {sig} nbdfuse pid {pid}"))(e)),
        }
        if wait_until(wait, gone).await {
            return Ok(());
        }
    }
    Err(AttachError::NotReady {
        context: ctx.to_owned(),
        what: format!("nbdfuse (pid {pid}) to exit"),
        timeout: RELEASE_TIMEOUT,
    })
}

/// True when `pid` is a live (not zombie) nbdfuse or zebu-nbd-fuse serving
/// `backing`; checks the command line so a recycled pid is never mistaken
/// for ours.
pub(super) fn is_our_server(pid: i32, backing: &Path) -> bool {
    const SERVERS: [&str; 2] = ["nbdfuse", BRIDGE_BINARY];
    let Some(process) = u32::try_from(pid).ok().and_then(zebu_common::procfs::live) else {
        return false;
    };
    if process.args.is_empty() {
        // An exiting process has released its memory (and so its command
        // line) before it becomes a zombie: still running, judge by name.
        return SERVERS.contains(&process.comm.as_str());
    }
    let mut args = process.args.iter();
    let is_server = args.next().is_some_and(|a0| {
        SERVERS
            .iter()
            .any(|s| Path::new(OsStr::from_bytes(a0)).ends_with(s))
    });
    is_server && args.any(|a| a.as_slice() == backing.as_os_str().as_bytes())
}
