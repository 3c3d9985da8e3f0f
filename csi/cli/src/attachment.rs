//! `zebu volume attach | detach`: the kubelet's sequence, run by hand.
//!
//! Attach: NodeGetInfo → ControllerPublishVolume → NodeStageVolume (staging
//! path under the state directory) → NodePublishVolume (the target). Every
//! step is recorded in `STATE_DIR/attachments/<volume>.json` before it runs,
//! so detach finds the paths even after an interrupted attach. A failed
//! attach undoes every step it attempted (the CSI calls are idempotent, and
//! undoing a step that did nothing is a no-op), and says what it undid.
//! Attaching again with the same target re-runs the sequence, which
//! completes an interrupted attach and changes nothing on a complete one.
//!
//! Detach: NodeUnpublishVolume → NodeUnstageVolume → ControllerUnpublishVolume,
//! then the record is removed.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tonic::Code;
use zebu_proto::csi::NodeGetInfoRequest;

use super::args::AttachArgs;
use super::caps::{controller_publishes, node_caps};
use super::driver::Driver;
use super::error::{Call, RpcError, Subject};
use super::request;
use super::state::{Access, Attachment, StateDir};
use super::volume::get_volume;
use zebu_common::context::VOLUME_FSTYPE;

/// One step of an attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// ControllerPublishVolume.
    ControllerPublish,
    /// NodeStageVolume.
    Stage,
    /// NodePublishVolume.
    Publish,
}

impl Step {
    /// The RPC doing the step.
    pub fn rpc(self) -> &'static str {
        match self {
            Step::ControllerPublish => "ControllerPublishVolume",
            Step::Stage => "NodeStageVolume",
            Step::Publish => "NodePublishVolume",
        }
    }

    /// The RPC undoing it.
    pub fn undo_rpc(self) -> &'static str {
        match self {
            Step::ControllerPublish => "ControllerUnpublishVolume",
            Step::Stage => "NodeUnstageVolume",
            Step::Publish => "NodeUnpublishVolume",
        }
    }
}

/// The steps of `att`, in attach order.
pub fn steps(att: &Attachment) -> Vec<Step> {
    let mut s = Vec::with_capacity(3);
    if att.controller_published {
        s.push(Step::ControllerPublish);
    }
    if att.staging.is_some() {
        s.push(Step::Stage);
    }
    s.push(Step::Publish);
    s
}

fn vol(op: &'static str, id: &str) -> Call {
    Call::new(op, Subject::Volume(id.to_owned()))
}

/// Runs one attach step; ControllerPublishVolume's reply goes into `att`.
async fn run_step(d: &Driver, att: &mut Attachment, step: Step) -> anyhow::Result<()> {
    let id = att.volume_id.clone();
    match step {
        Step::ControllerPublish => {
            let call = vol(step.rpc(), &id);
            let r = d
                .call(
                    call,
                    d.controller
                        .clone()
                        .controller_publish_volume(request::controller_publish(att)),
                )
                .await?;
            att.publish_context = r.publish_context.into_iter().collect();
        }
        Step::Stage => {
            if let Some(staging) = &att.staging {
                std::fs::create_dir_all(staging).with_context(|| {
                    format!("cannot create the staging directory {}", staging.display())
                })?;
            }
            d.call(
                vol(step.rpc(), &id),
                d.node.clone().node_stage_volume(request::node_stage(att)),
            )
            .await?;
        }
        Step::Publish => {
            if let Some(parent) = att.target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create the directory {}", parent.display()))?;
            }
            d.call(
                vol(step.rpc(), &id),
                d.node
                    .clone()
                    .node_publish_volume(request::node_publish(att)),
            )
            .await?;
        }
    }
    Ok(())
}

/// Undoes one step. A volume the driver no longer knows counts as undone.
async fn undo_step(d: &Driver, att: &Attachment, step: Step) -> Result<(), RpcError> {
    let id = &att.volume_id;
    let call = vol(step.undo_rpc(), id);
    let r = match step {
        Step::ControllerPublish => d
            .call(
                call,
                d.controller
                    .clone()
                    .controller_unpublish_volume(request::controller_unpublish(att)),
            )
            .await
            .map(drop),
        Step::Stage => d
            .call(
                call,
                d.node
                    .clone()
                    .node_unstage_volume(request::node_unstage(att)),
            )
            .await
            .map(drop),
        Step::Publish => d
            .call(
                call,
                d.node
                    .clone()
                    .node_unpublish_volume(request::node_unpublish(att)),
            )
            .await
            .map(drop),
    };
    match r {
        Err(e) if e.code() == Code::NotFound => Ok(()),
        r => r,
    }
}

/// Removes the staging directory if it is empty (what NodeUnstage leaves).
fn remove_staging(att: &Attachment) {
    if let Some(s) = &att.staging {
        let _ = std::fs::remove_dir(s);
    }
}

fn access_name(a: &Access) -> &'static str {
    match a {
        Access::Mount { .. } => "mounted",
        Access::Block => "as a block device",
    }
}

/// The absolute target asked for, and the access it implies (fs type not
/// yet chosen).
fn requested(a: &AttachArgs) -> anyhow::Result<(PathBuf, bool)> {
    let (path, block) = match (&a.mount, &a.block) {
        (Some(m), None) => (m, false),
        (None, Some(b)) => (b, true),
        _ => bail!("give exactly one of --mount DIR and --block FILE"),
    };
    let abs = std::path::absolute(path)
        .with_context(|| format!("cannot make {} an absolute path", path.display()))?;
    Ok((abs, block))
}

/// Checks that an existing record is the attachment asked for.
fn check_same(
    existing: &Attachment,
    target: &Path,
    block: bool,
    a: &AttachArgs,
) -> anyhow::Result<()> {
    let id = &a.id;
    let same_kind = matches!(existing.access, Access::Block) == block;
    let same_fs = match (&existing.access, a.fstype) {
        (Access::Mount { fs_type }, Some(f)) => fs_type.is_empty() || fs_type == f.as_str(),
        _ => true,
    };
    if existing.target != target || !same_kind || existing.read_only != a.read_only || !same_fs {
        bail!(
            "volume {id} is already attached through this CLI at {} ({}{}): \
             detach it first with `zebu volume detach {id}`",
            existing.target.display(),
            access_name(&existing.access),
            if existing.read_only {
                ", read-only"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `zebu volume attach`.
pub async fn attach(d: &Driver, state: &StateDir, a: &AttachArgs) -> anyhow::Result<()> {
    let id = a.id.as_str();
    let (target, block) = requested(a)?;
    let existing = state
        .load(id)
        .with_context(|| format!("cannot read the attachment record of volume {id}"))?;
    if let Some(ex) = &existing {
        check_same(ex, &target, block, a)?;
    }

    let volume = get_volume(d, id).await?;
    let node_id = d
        .call(
            Call::new("NodeGetInfo", Subject::Driver),
            d.node.clone().node_get_info(NodeGetInfoRequest {}),
        )
        .await?
        .node_id;
    if node_id.is_empty() {
        bail!("the driver's Node service returned an empty node id");
    }
    let controller_published = controller_publishes(d).await?;
    let caps = node_caps(d).await?;

    let was_complete = existing.as_ref().is_some_and(|e| e.complete);
    let mut att = match existing {
        Some(ex) => ex,
        None => Attachment {
            volume_id: id.to_owned(),
            node_id,
            access: if block {
                Access::Block
            } else {
                Access::Mount {
                    fs_type: a
                        .fstype
                        .map(|f| f.as_str().to_owned())
                        .or_else(|| volume.context.get(VOLUME_FSTYPE).cloned())
                        .unwrap_or_default(),
                }
            },
            target,
            staging: caps.stage.then(|| state.staging(id)),
            read_only: a.read_only,
            controller_published,
            publish_context: Default::default(),
            volume_context: volume.context.clone(),
            complete: false,
        },
    };
    // Record before acting, so detach can clean up whatever happens next.
    state
        .save(&att)
        .with_context(|| format!("cannot record the attachment in {}", state.root().display()))?;

    let mut attempted = Vec::new();
    let mut failure = None;
    for step in steps(&att) {
        attempted.push(step);
        let r = run_step(d, &mut att, step).await;
        if let Err(e) = r {
            failure = Some((step, e));
            break;
        }
        if step == Step::ControllerPublish {
            state.save(&att).with_context(|| {
                format!("cannot record the attachment in {}", state.root().display())
            })?;
        }
    }

    let Some((step, err)) = failure else {
        att.complete = true;
        state.save(&att).with_context(|| {
            format!("cannot record the attachment in {}", state.root().display())
        })?;
        let how = match (&att.access, att.read_only) {
            (Access::Mount { .. }, false) => "mounted at",
            (Access::Mount { .. }, true) => "mounted read-only at",
            (Access::Block, false) => "block device at",
            (Access::Block, true) => "read-only block device at",
        };
        if was_complete {
            println!("volume {id} is attached: {how} {}", att.target.display());
        } else {
            println!("attached volume {id}: {how} {}", att.target.display());
        }
        return Ok(());
    };

    let why = format!("{err:#}");
    let failed = if why.contains(step.rpc()) {
        format!("attaching volume {id} failed: {why}")
    } else {
        format!("attaching volume {id} failed at {}: {why}", step.rpc())
    };
    if was_complete {
        bail!(
            "{failed}; the volume was attached before this command, so nothing was undone: \
             check it, or detach it with `zebu volume detach {id}`"
        );
    }
    let mut undone = Vec::new();
    for &s in attempted.iter().rev() {
        if let Err(e) = undo_step(d, &att, s).await {
            bail!(
                "{failed}; rolling back failed at {} ({e}){}: the attachment record is kept, \
                 run `zebu volume detach {id}` to finish cleaning up",
                s.undo_rpc(),
                if undone.is_empty() {
                    String::new()
                } else {
                    format!(" after {}", undone.join(", "))
                }
            );
        }
        undone.push(s.undo_rpc());
    }
    remove_staging(&att);
    state.remove(id).with_context(|| {
        format!("{failed}; rolled back, but cannot remove the attachment record")
    })?;
    bail!(
        "{failed}; rolled back ({}): nothing is left attached",
        undone.join(", ")
    )
}

/// `zebu volume detach`.
pub async fn detach(d: &Driver, state: &StateDir, id: &str) -> anyhow::Result<()> {
    let Some(mut att) = state
        .load(id)
        .with_context(|| format!("cannot read the attachment record of volume {id}"))?
    else {
        eprintln!(
            "volume {id} is not attached through this CLI (no record in {}): nothing to do",
            state.record_path(id).display()
        );
        return Ok(());
    };
    if att.complete {
        att.complete = false;
        state.save(&att).with_context(|| {
            format!(
                "cannot update the attachment record in {}",
                state.root().display()
            )
        })?;
    }
    for s in steps(&att).into_iter().rev() {
        undo_step(d, &att, s).await.map_err(|e| {
            anyhow::anyhow!(
                "detaching volume {id} failed at {}: {e}; the attachment record is kept: \
                 fix the cause and run `zebu volume detach {id}` again",
                s.undo_rpc()
            )
        })?;
    }
    remove_staging(&att);
    state
        .remove(id)
        .with_context(|| format!("volume {id} is detached, but its record cannot be removed"))?;
    println!("detached volume {id} from {}", att.target.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command, FsType, VolumeCmd};
    use clap::Parser;

    fn att(controller: bool, staged: bool) -> Attachment {
        Attachment {
            volume_id: "v".into(),
            node_id: "n".into(),
            access: Access::Mount {
                fs_type: "ext4".into(),
            },
            target: "/mnt/v".into(),
            staging: staged.then(|| "/s/v".into()),
            read_only: false,
            controller_published: controller,
            publish_context: Default::default(),
            volume_context: Default::default(),
            complete: true,
        }
    }

    #[test]
    fn steps_follow_capabilities() {
        use Step::*;
        assert_eq!(
            steps(&att(true, true)),
            vec![ControllerPublish, Stage, Publish]
        );
        assert_eq!(steps(&att(false, true)), vec![Stage, Publish]);
        assert_eq!(steps(&att(true, false)), vec![ControllerPublish, Publish]);
        assert_eq!(steps(&att(false, false)), vec![Publish]);
        assert_eq!(Stage.undo_rpc(), "NodeUnstageVolume");
    }

    fn args(argv: &[&str]) -> AttachArgs {
        let mut full = vec!["zebu", "volume", "attach"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Volume(VolumeCmd::Attach(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reattach_must_match_the_record() {
        let ex = att(true, true);
        let ok = args(&["v", "--mount", "/mnt/v"]);
        let (t, b) = requested(&ok).unwrap();
        assert!(check_same(&ex, &t, b, &ok).is_ok());
        let same_fs = args(&["v", "--mount", "/mnt/v", "--fstype", "ext4"]);
        assert!(check_same(&ex, &t, b, &same_fs).is_ok());
        assert_eq!(same_fs.fstype, Some(FsType::Ext4));

        for bad in [
            args(&["v", "--mount", "/mnt/other"]),
            args(&["v", "--mount", "/mnt/v", "--read-only"]),
            args(&["v", "--mount", "/mnt/v", "--fstype", "xfs"]),
            args(&["v", "--block", "/mnt/v"]),
        ] {
            let (t, b) = requested(&bad).unwrap();
            let e = check_same(&ex, &t, b, &bad).unwrap_err().to_string();
            assert!(
                e.contains("already attached through this CLI at /mnt/v (mounted)")
                    && e.contains("zebu volume detach v"),
                "{e}"
            );
        }
    }

    #[test]
    fn relative_targets_become_absolute() {
        let (t, block) = requested(&args(&["v", "--block", "dev/v"])).unwrap();
        assert!(t.is_absolute() && t.ends_with("dev/v"));
        assert!(block);
    }
}
