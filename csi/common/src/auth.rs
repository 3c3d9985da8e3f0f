//! Bearer tokens on the node agent's API: the agent can create processes
//! and delete data, so in a cluster only callers holding the token (the
//! controller, from a Secret) may use it.
//!
//! Invariant: an agent given a token refuses every call whose
//! `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED,
//! before the call reaches the service; the comparison takes the same time
//! wherever the first differing byte is.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest token accepted: a guessable token protects nothing.
pub const MIN_TOKEN_LEN: usize = 16;

/// Errors of reading a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read the agent token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token is unusable.
    #[error("the agent token in {path} is unusable: {reason}")]
    Invalid {
        /// Where it came from.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A bearer token.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token in `path` (surrounding whitespace ignored, as a Secret
    /// mounted as a file may end with a newline).
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let raw = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Token::parse(raw.trim()).map_err(|reason| AuthError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// `s` as a token: at least [`MIN_TOKEN_LEN`] visible ASCII characters.
    pub fn parse(s: &str) -> Result<Token, String> {
        if s.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "it has {} characters; use at least {MIN_TOKEN_LEN} (e.g. head -c 32 /dev/urandom | base64)",
                s.len()
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("it may hold only visible ASCII characters".into());
        }
        Ok(Token(s.into()))
    }

    /// The `authorization` header value that presents this token.
    pub fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// Equal bytes, in a time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds the token to every call (nothing without one).
#[derive(Clone, Debug, Default)]
pub struct Present(pub Option<Token>);

impl Interceptor for Present {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v = MetadataValue::try_from(t.header())
                .map_err(|_| Status::internal("the agent token is not a valid header value"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the token (accepts all without one).
#[derive(Clone, Debug, Default)]
pub struct Require(pub Option<Token>);

impl Interceptor for Require {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(t) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if same(given, t.header().as_bytes()) {
            Ok(req)
        } else if given.is_empty() {
            Err(Status::unauthenticated(
                "this endpoint (a node agent, or a controller's forwarding endpoint) requires \
                 the driver's bearer token: give the caller --agent-token-file with the token \
                 this side was started with",
            ))
        } else {
            Err(Status::unauthenticated(
                "wrong bearer token: the caller's --agent-token-file must hold the token this \
                 node agent or controller was started with",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::parse("0123456789abcdefXYZ").unwrap()
    }

    #[test]
    fn a_presented_token_passes_and_nothing_else_does() {
        let mut client = Present(Some(token()));
        let mut server = Require(Some(token()));
        let req = client.call(Request::new(())).unwrap();
        assert!(server.call(req).is_ok());
        let bare = server.call(Request::new(())).unwrap_err();
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
        assert!(bare.message().contains("--agent-token-file"), "{bare:?}");
        let other = Token::parse("0123456789abcdefXYz").unwrap();
        let wrong = server.call(Present(Some(other)).call(Request::new(())).unwrap());
        assert_eq!(wrong.unwrap_err().code(), tonic::Code::Unauthenticated);
        // No token configured: open, and nothing is added.
        assert!(Require(None).call(Request::new(())).is_ok());
        let plain = Present(None).call(Request::new(())).unwrap();
        assert!(plain.metadata().get("authorization").is_none());
    }

    #[test]
    fn weak_or_malformed_tokens_are_refused() {
        assert!(Token::parse("short").unwrap_err().contains("at least 16"));
        assert!(Token::parse("0123456789abcdef ghi").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "0123456789abcdefXYZ\n").unwrap();
        assert!(Token::from_file(&p).is_ok());
        let e = Token::from_file(&dir.path().join("none")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the agent token file"),
            "{e}"
        );
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
