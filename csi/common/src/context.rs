//! Names shared between the controller, the node service and the CLI: the
//! driver's name and the keys of the string maps CSI carries between them.

/// The CSI driver name.
pub const DRIVER_NAME: &str = "zebu.csi.dev";

/// `publish_context` key: NBD URI of the volume's engine on the node
/// (`nbd+unix:///?socket=PATH`).
pub const PUBLISH_NBD_URI: &str = "zebu.csi.dev/nbd-uri";
/// `publish_context` key: `host:port` of the engine's control API.
pub const PUBLISH_ENGINE: &str = "zebu.csi.dev/engine";
/// `publish_context` key: the file the engine serves the volume as on the
/// node (on a FUSE mount of its own), for the node's loop device.
pub const PUBLISH_FILE: &str = "zebu.csi.dev/file";

/// `volume_context` key: filesystem type the volume was created for (the
/// node formats with it when the capability names none).
pub const VOLUME_FSTYPE: &str = "zebu.csi.dev/fstype";
/// `volume_context` key: number of replicas.
pub const VOLUME_REPLICAS: &str = "zebu.csi.dev/replicas";
/// `volume_context` key: where each replica lives, `node:address` joined by `,`.
pub const VOLUME_REPLICA_PLACEMENT: &str = "zebu.csi.dev/placement";
/// `volume_context` key: `host:port` of the engine's control API while the
/// volume is attached (absent otherwise).
pub const VOLUME_ENGINE: &str = "zebu.csi.dev/engine";
/// `volume_context` key: node the volume is attached to, if any.
pub const VOLUME_ATTACHED_NODE: &str = "zebu.csi.dev/attached-node";

/// CreateVolume parameter: number of replicas (default 3).
pub const PARAM_REPLICAS: &str = "numberOfReplicas";
/// CreateVolume parameter set by the external-provisioner: filesystem type.
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
