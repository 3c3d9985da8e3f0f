//! Running the node's tools (losetup, mkfs, resize2fs, …) with a timeout and
//! an error that names the command line and its output; blocking syscalls
//! off the runtime; polling until a condition holds.

use super::*;

// ---------------------------------------------------------------------------
// External commands.

pub(super) fn command_line(program: &str, args: &[OsString]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `program args...` with stdin closed, capturing output, killing it
/// after `timeout`. Returns the output whatever the exit status.
pub(super) async fn run_output<I, S>(
    context: &str,
    program: &str,
    args: I,
    timeout: Duration,
) -> Result<std::process::Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = command_line(program, &args);
    debug!(%command, "running");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Dropping the future on timeout kills the child.
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| AttachError::Spawn {
        context: context.to_owned(),
        command: command.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(AttachError::Io {
            context: format!("{context}: waiting for `{command}`"),
            source,
        }),
        Err(_) => Err(AttachError::Timeout {
            context: context.to_owned(),
            command,
            timeout,
        }),
    }
}

/// Like [`run_output`] but a non-zero exit is an error; returns stdout.
pub(super) async fn run<I, S>(
    context: &str,
    program: &str,
    args: I,
    timeout: Duration,
) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run_output(context, program, &args, timeout).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_failed(context, program, &args, &out))
    }
}

pub(super) fn command_failed(
    context: &str,
    program: &str,
    args: &[OsString],
    out: &std::process::Output,
) -> AttachError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    AttachError::Command {
        context: context.to_owned(),
        command: command_line(program, args),
        status: out.status.to_string(),
        stderr,
    }
}

/// Runs blocking work (syscalls that may wait on I/O) off the async threads.
pub(super) async fn blocking<T, F>(context: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(AttachError::Io {
            context: context.to_owned(),
            source: io::Error::other(e),
        }),
    }
}

/// Polls `check` (cheap, non-blocking) until it is true or `timeout` passes.
/// Back-off from 5 ms to 100 ms; returns whether it became true.
pub(super) async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if check() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
