//! The Secret that holds the node agents' bearer token in a cluster.
//!
//! Invariants:
//! - The token is made here, once, from the kernel's random source, and is
//!   never printed: `ensure` creates the Secret only when it is absent and
//!   otherwise leaves it exactly as it is, so re-running an install keeps
//!   the token every running controller and node already holds.
//! - Two installers racing both succeed: the loser of the create sees the
//!   API server's conflict and reports the winner's Secret as existing.
//!
//! The install runs it as a Job (`zebu-csi agent-token`) whose service
//! account may create Secrets in the driver's namespace; the controller and
//! node Pods mount the Secret as a file (`--agent-token-file`) and wait in
//! ContainerCreating until it exists.

use std::collections::BTreeMap;
use std::io::Read;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

/// The key of the token inside the Secret (the file name when mounted).
pub const KEY: &str = "token";

/// What [`ensure`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret did not exist; it now holds a new token.
    Created,
    /// The Secret existed and holds a usable token; it was left alone.
    Existing,
}

/// Errors of making or checking the Secret.
#[derive(Debug, thiserror::Error)]
pub enum AgentSecretError {
    /// `/dev/urandom` could not be read.
    #[error("reading the kernel's random source: {0}")]
    Random(#[source] std::io::Error),
    /// A call to the API server failed.
    #[error("the Kubernetes API refused {what} Secret {namespace}/{name}: {source}")]
    Api {
        /// What was being done.
        what: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Secret exists but holds no token the driver accepts.
    #[error(
        "Secret {namespace}/{name} exists but its `{KEY}` is unusable ({reason}); delete it \
         (kubectl -n {namespace} delete secret {name}) and run this again, then restart the \
         controller and node Pods"
    )]
    Unusable {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A new token: 32 random bytes as 64 hex digits.
fn new_token() -> Result<String, AgentSecretError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(AgentSecretError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates Secret `namespace/name` with a new token unless it exists; an
/// existing one must hold a token the driver accepts.
pub async fn ensure(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<Outcome, AgentSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let err = |what, source| AgentSecretError::Api {
        what,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    let existing = match api.get_opt(name).await.map_err(|e| err("reading", e))? {
        Some(s) => s,
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_owned(),
                        "zebu".to_owned(),
                    )])),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([(KEY.to_owned(), new_token()?)])),
                type_: Some("Opaque".to_owned()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    api.get(name).await.map_err(|e| err("reading", e))?
                }
                Err(e) => return Err(err("creating", e)),
            }
        }
    };
    let unusable = |reason: String| AgentSecretError::Unusable {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let value = existing
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .ok_or_else(|| unusable("it has no such key".into()))?;
    let text = std::str::from_utf8(&value.0).map_err(|_| unusable("not UTF-8".into()))?;
    zebu_common::auth::Token::parse(text.trim()).map_err(unusable)?;
    Ok(Outcome::Existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_accepted_by_the_driver() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(zebu_common::auth::Token::parse(&a).is_ok());
    }
}
