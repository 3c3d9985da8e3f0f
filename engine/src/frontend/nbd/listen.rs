//! Where the server listens: `unix:PATH` or `tcp:HOST:PORT` addresses,
//! binding them (a stale unix socket is replaced), accepting with backoff.

use super::*;

// ---------------------------------------------------------------------------
// Addresses and listeners.

/// Where to listen: parsed from `unix:PATH` or `tcp:HOST:PORT`
/// (`tcp:[::1]:10809` for IPv6 literals).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host (name or IP literal, without brackets) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port (0 picks a free port).
        port: u16,
    },
}

impl FromStr for ListenAddr {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, NbdError> {
        let invalid = |reason| NbdError::InvalidAddress {
            addr: s.to_owned(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("empty socket path (expected unix:PATH)"));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| invalid("missing port (expected tcp:HOST:PORT)"))?;
            let host = match host.strip_prefix('[') {
                Some(inner) => inner
                    .strip_suffix(']')
                    .ok_or_else(|| invalid("unbalanced '[' in host"))?,
                None => host,
            };
            if host.is_empty() {
                return Err(invalid("empty host (expected tcp:HOST:PORT)"));
            }
            let port = port
                .parse()
                .map_err(|_| invalid("port is not a number between 0 and 65535"))?;
            Ok(ListenAddr::Tcp {
                host: host.to_owned(),
                port,
            })
        } else {
            Err(invalid("expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            ListenAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A bound listening socket the server accepts connections on.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket listener.
    Unix(UnixListener),
    /// A TCP listener.
    Tcp(TcpListener),
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Listener::Unix(listener)
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Listener::Tcp(listener)
    }
}

/// A freshly accepted connection.
pub(super) enum Accepted {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Binds `addr`. For a unix socket, a stale socket file left by a previous
    /// run (nobody accepting on it) is replaced; a live one is an error.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, NbdError> {
        let bound = match addr {
            ListenAddr::Unix(path) => bind_unix(path).await.map(Listener::Unix),
            ListenAddr::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
                .await
                .map(Listener::Tcp),
        };
        bound.map_err(|source| NbdError::Bind {
            addr: addr.to_string(),
            source,
        })
    }

    /// The address actually bound (useful with TCP port 0).
    pub fn local_addr(&self) -> Result<ListenAddr, NbdError> {
        match self {
            Listener::Unix(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(io_error("reading the unix listener address"))?;
                addr.as_pathname()
                    .map(|path| ListenAddr::Unix(path.to_owned()))
                    .ok_or(NbdError::Internal("unix listener is not bound to a path"))
            }
            Listener::Tcp(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(io_error("reading the TCP listener address"))?;
                Ok(ListenAddr::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                })
            }
        }
    }

    /// Accepts one connection and describes the peer for logs.
    pub(super) async fn accept(&self) -> io::Result<(Accepted, String)> {
        match self {
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred().ok().and_then(|cred| cred.pid()) {
                    Some(pid) => format!("unix:pid={pid}"),
                    None => "unix".to_owned(),
                };
                Ok((Accepted::Unix(stream), peer))
            }
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                if let Err(err) = stream.set_nodelay(true) {
                    debug!(%peer, error = %err, "setting TCP_NODELAY failed");
                }
                Ok((Accepted::Tcp(stream), peer.to_string()))
            }
        }
    }
}

/// Binds a unix socket, replacing a stale socket file nobody listens on.
pub(super) async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
            if !is_socket || UnixStream::connect(path).await.is_ok() {
                return Err(err);
            }
            debug!(path = %path.display(), "replacing stale NBD unix socket");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

/// Parses `addr` (`unix:PATH` or `tcp:HOST:PORT`) and binds it.
pub async fn bind(addr: &str) -> Result<Listener, NbdError> {
    Listener::bind(&addr.parse()?).await
}

/// True for `accept` errors that mean the listening socket itself is unusable.
pub(super) fn is_fatal_accept_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}
