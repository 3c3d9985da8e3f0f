//! NBD URIs: `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`
//! parsed into an [`NbdUri`] (percent-escapes decoded, TLS refused).

use std::path::PathBuf;

use super::{DEFAULT_PORT, NbdError, Result};

/// Where an export is: parsed from an NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The socket.
    pub address: NbdAddress,
    /// The export name (`""`: the server's default export).
    pub export: String,
}

/// The transport of an [`NbdUri`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp {
        /// Host name or address (without brackets for IPv6).
        host: String,
        /// Port.
        port: u16,
    },
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl std::str::FromStr for NbdUri {
    type Err = NbdError;

    /// Parses `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`
    /// (percent-escapes decoded). TLS schemes (`nbds…`) are refused.
    fn from_str(uri: &str) -> Result<NbdUri> {
        let bad = |reason: &str| NbdError::InvalidUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-escape in export"))?;
        let params: Vec<(&str, &str)> = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix URIs have no host"));
                }
                let socket = params
                    .iter()
                    .find(|(k, _)| *k == "socket")
                    .map(|(_, v)| *v)
                    .ok_or_else(|| bad("missing ?socket=PATH"))?;
                let socket =
                    percent_decode(socket).ok_or_else(|| bad("bad percent-escape in socket"))?;
                if socket.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(NbdUri {
                    address: NbdAddress::Unix(PathBuf::from(socket)),
                    export,
                })
            }
            "nbd" => {
                let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                    let (h, p) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                    (h, p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("missing host"));
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Ok(NbdUri {
                    address: NbdAddress::Tcp {
                        host: host.to_owned(),
                        port,
                    },
                    export,
                })
            }
            _ => Err(bad("unsupported scheme (expected nbd+unix or nbd)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp_uris() {
        let u: NbdUri = "nbd+unix:///vol?socket=/run/zebu/e.sock".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/zebu/e.sock".into()));
        assert_eq!(u.export, "vol");
        let u: NbdUri = "nbd+unix://?socket=/a%20b".parse().unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/a b".into()));
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://localhost:10810/my%2Fdisk".parse().unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "localhost".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "my/disk");
        let u: NbdUri = "nbd://[::1]".parse().unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        for bad in [
            "nbd+unix:///x",
            "nbds://h/x",
            "/tmp/sock",
            "nbd://:1/x",
            "nbd://h:99999/",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///%zz?socket=/s",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad}");
        }
    }
}
