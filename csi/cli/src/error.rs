//! Turning transport and gRPC failures into messages that say what failed
//! and what to do about it.

use std::fmt;

use tonic::{Code, Status};

use zebu_common::grpc::GrpcError;

/// What an RPC was about, for messages ("volume X does not exist").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A volume by id or name.
    Volume(String),
    /// A snapshot by id or name.
    Snapshot(String),
    /// A node by id.
    Node(String),
    /// The driver itself.
    Driver,
    /// A volume's engine at this control address.
    Engine(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Volume(v) => write!(f, "volume {v}"),
            Subject::Snapshot(s) => write!(f, "snapshot {s}"),
            Subject::Node(n) => write!(f, "node {n}"),
            Subject::Driver => f.write_str("the driver"),
            Subject::Engine(a) => write!(f, "the engine at {a}"),
        }
    }
}

/// One RPC as the user would name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The RPC name (`CreateVolume`).
    pub op: &'static str,
    /// What it is about.
    pub subject: Subject,
    /// What NOT_FOUND means when it is not `subject` (the source of a
    /// clone, say).
    pub missing: Option<Subject>,
}

impl Call {
    /// An RPC `op` about `subject`.
    pub fn new(op: &'static str, subject: Subject) -> Call {
        Call {
            op,
            subject,
            missing: None,
        }
    }

    /// Says NOT_FOUND refers to `missing` rather than the subject.
    pub fn not_found_means(mut self, missing: Subject) -> Call {
        self.missing = Some(missing);
        self
    }
}

/// A failed RPC: the call, the endpoint it went to, and the status.
#[derive(Debug)]
pub struct RpcError {
    /// The endpoint dialled.
    pub endpoint: String,
    /// The call.
    pub call: Call,
    /// The status the server (or the transport) returned.
    pub status: Status,
}

impl RpcError {
    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.status.code()
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&explain(&self.endpoint, &self.call, &self.status))
    }
}

impl std::error::Error for RpcError {}

/// What to suggest when the driver cannot be reached.
fn unreachable(endpoint: &str, what: &Subject) -> String {
    match what {
        Subject::Engine(addr) => format!(
            "cannot reach the engine of this volume at {addr}: it may be restarting; \
             retry, and check `zebu volume get`"
        ),
        _ => {
            format!("cannot reach the Zebu driver at {endpoint}: is `zebu-csi standalone` running?")
        }
    }
}

/// The message for a failed call.
pub fn explain(endpoint: &str, call: &Call, status: &Status) -> String {
    let detail = status.message().trim();
    let with = |s: String| {
        if detail.is_empty() {
            s
        } else {
            format!("{s} ({detail})")
        }
    };
    let subject = &call.subject;
    let op = call.op;
    match status.code() {
        Code::NotFound => with(format!(
            "{} does not exist",
            call.missing.as_ref().unwrap_or(subject)
        )),
        Code::AlreadyExists => with(format!(
            "{subject} already exists with different parameters: \
             pick another name, or delete the existing one first"
        )),
        Code::InvalidArgument => {
            if detail.is_empty() {
                format!("{op}: the driver rejected the request as invalid")
            } else {
                format!("{op}: {detail}")
            }
        }
        Code::Aborted => with(format!(
            "another operation on {subject} is in progress: retry in a moment"
        )),
        Code::FailedPrecondition => with(format!("{op} refused for {subject}")),
        Code::ResourceExhausted => with(format!(
            "not enough capacity for {subject}: free space, add disks or nodes, or ask for fewer replicas"
        )),
        Code::OutOfRange => with(format!(
            "{op}: size out of the supported range for {subject}"
        )),
        Code::Unavailable => with(unreachable(endpoint, subject)),
        Code::DeadlineExceeded => with(format!(
            "{op} for {subject} timed out; it may still complete: run the same command again \
             (it is safe to repeat) or raise --timeout"
        )),
        Code::Unimplemented => with(format!("the driver at {endpoint} does not implement {op}")),
        Code::PermissionDenied | Code::Unauthenticated => {
            with(format!("{op} for {subject}: permission denied"))
        }
        Code::Cancelled => with(format!("{op} for {subject} was cancelled")),
        _ => with(format!("{op} failed for {subject}")),
    }
}

/// The message for a failed dial: the endpoint, a hint, and the underlying
/// reason in a few words.
pub fn connect_message(endpoint: &str, what: &Subject, err: &GrpcError) -> String {
    match err {
        GrpcError::BadEndpoint(_) => err.to_string(),
        GrpcError::Connect { source, .. } => {
            format!("{} ({})", unreachable(endpoint, what), root_cause(source))
        }
    }
}

/// The innermost reason of an error chain, in a few words: I/O errors by
/// kind ("connection refused", "no such socket"), others by their text.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = err;
    let mut io: Option<&std::io::Error> = None;
    loop {
        if let Some(e) = cur.downcast_ref::<std::io::Error>() {
            io = Some(e);
        }
        match cur.source() {
            Some(next) => cur = next,
            None => break,
        }
    }
    if let Some(e) = io {
        use std::io::ErrorKind as K;
        return match e.kind() {
            K::ConnectionRefused => "connection refused".to_owned(),
            K::NotFound => "no such socket".to_owned(),
            K::PermissionDenied => {
                "permission denied: run as root or with access to the socket".to_owned()
            }
            K::TimedOut => "timed out".to_owned(),
            K::ConnectionReset => "connection reset".to_owned(),
            _ => e.to_string(),
        };
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "unix:///run/zebu/csi.sock";

    fn vol(op: &'static str) -> Call {
        Call::new(op, Subject::Volume("pvc-1".into()))
    }

    #[test]
    fn not_found_names_the_volume() {
        let m = explain(EP, &vol("ControllerGetVolume"), &Status::not_found(""));
        assert_eq!(m, "volume pvc-1 does not exist");
        let m = explain(
            EP,
            &vol("ControllerGetVolume"),
            &Status::not_found("no such volume"),
        );
        assert_eq!(m, "volume pvc-1 does not exist (no such volume)");
    }

    #[test]
    fn not_found_of_a_source_names_the_source() {
        let call = Call::new("CreateVolume", Subject::Volume("new".into()))
            .not_found_means(Subject::Snapshot("snap-9".into()));
        assert_eq!(
            explain(EP, &call, &Status::not_found("")),
            "snapshot snap-9 does not exist"
        );
    }

    #[test]
    fn invalid_argument_passes_the_driver_message_through() {
        let m = explain(
            EP,
            &vol("CreateVolume"),
            &Status::invalid_argument("numberOfReplicas must be 1..5"),
        );
        assert_eq!(m, "CreateVolume: numberOfReplicas must be 1..5");
    }

    #[test]
    fn other_codes_say_what_to_do() {
        let m = explain(EP, &vol("CreateVolume"), &Status::already_exists(""));
        assert!(m.starts_with("volume pvc-1 already exists"), "{m}");
        let m = explain(EP, &vol("DeleteVolume"), &Status::aborted("busy"));
        assert_eq!(
            m,
            "another operation on volume pvc-1 is in progress: retry in a moment (busy)"
        );
        let m = explain(EP, &vol("ListVolumes"), &Status::unavailable("gone"));
        assert_eq!(
            m,
            "cannot reach the Zebu driver at unix:///run/zebu/csi.sock: \
             is `zebu-csi standalone` running? (gone)"
        );
        let m = explain(
            EP,
            &vol("ControllerExpandVolume"),
            &Status::unimplemented(""),
        );
        assert_eq!(
            m,
            "the driver at unix:///run/zebu/csi.sock does not implement ControllerExpandVolume"
        );
        let m = explain(
            EP,
            &vol("DeleteVolume"),
            &Status::failed_precondition("volume is attached"),
        );
        assert_eq!(
            m,
            "DeleteVolume refused for volume pvc-1 (volume is attached)"
        );
        let m = explain(
            EP,
            &vol("CreateVolume"),
            &Status::resource_exhausted("2 nodes"),
        );
        assert!(m.starts_with("not enough capacity for volume pvc-1"), "{m}");
        assert!(m.ends_with("(2 nodes)"), "{m}");
        let m = explain(EP, &vol("X"), &Status::internal("boom"));
        assert_eq!(m, "X failed for volume pvc-1 (boom)");
        let m = explain(
            EP,
            &Call::new("Status", Subject::Engine("127.0.0.21:9500".into())),
            &Status::unavailable(""),
        );
        assert!(m.starts_with("cannot reach the engine of this volume at 127.0.0.21:9500"));
    }

    #[test]
    fn root_cause_digs_out_io_errors() {
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Wrap(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(root_cause(&e), "connection refused");
        let e = Wrap(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(root_cause(&e), "no such socket");
    }
}
