//! The driver killed halfway through a CSI call: CreateVolume after the
//! first of three replicas was made, ControllerPublishVolume after the
//! engine started and before the attachment was recorded, NodeStageVolume
//! after the device was attached and before the filesystem was made, and
//! DeleteVolume after the first replica was deleted. The process kills
//! itself at a crash point (`zebu_proto::crash`), exactly at that step.
//!
//! A new driver starts on the same state, and the call is retried as the
//! container orchestrator would: it succeeds, the volume then works (a
//! file written through the mount reads back), and once the volume is
//! detached and deleted nothing is left: no replica or engine process, no
//! replica directory, no mount, no loop device.

mod common;

use std::path::Path;

use common::*;
use zebu_proto::csi as pb;

/// The step of the life of a volume where the driver dies.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Create,
    Publish,
    Stage,
    Delete,
}

impl Step {
    fn point(self) -> &'static str {
        match self {
            Step::Create => "csi.create-volume.partial",
            Step::Publish => "csi.publish.engine-started",
            Step::Stage => "csi.node-stage.attached",
            Step::Delete => "csi.delete-volume.partial",
        }
    }
}

/// Runs a volume's life (create, publish, stage, publish to a target,
/// write, read, unpublish, unstage, unpublish from the node, delete) on a
/// standalone driver that dies at `step`; the call that killed it is
/// retried on a new driver, and the life goes on there.
fn crash_at(step: Step) {
    let _serial = serial();
    require_node_tools();
    require_data_path_bins();
    let tmp = tempdir();
    let root = tmp.path().to_owned();
    let _scrub = Scrub(root.clone());
    let rt = rt();
    let name = "crashed";
    let mut life = Life {
        step,
        driver: Driver::standalone_crashing_at(&root, "solo", 3, &[], Some(step.point())),
        root: root.clone(),
        crashed: false,
    };
    let ep = life.driver.endpoint.clone();

    let volume_id = std::cell::RefCell::new(String::new());
    life.call(Step::Create, &|_| {
        rt.block_on(async {
            let v = controller(&ep)
                .await
                .create_volume(create_request(name, 3, &[]))
                .await
                .map_err(|s| format!("CreateVolume: {s}"))?
                .into_inner()
                .volume
                .expect("a volume");
            *volume_id.borrow_mut() = v.volume_id;
            Ok(())
        })
    });
    let id = volume_id.borrow().clone();
    let publish_context = std::cell::RefCell::new(Default::default());
    life.call(Step::Publish, &|d| {
        rt.block_on(async {
            let r = controller(&ep)
                .await
                .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: d.node_id.clone(),
                    volume_capability: Some(mount_cap()),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("ControllerPublishVolume: {s}"))?;
            *publish_context.borrow_mut() = r.into_inner().publish_context;
            Ok(())
        })
    });
    let engines = pids_with(&["zebu-engine", &id]);
    assert_eq!(engines.len(), 1, "engines of {id}: {engines:?}");

    let staging = root.join("staging");
    let target = root.join("target");
    life.call(Step::Stage, &|d| {
        let publish_context = publish_context.borrow().clone();
        rt.block_on(async {
            node(&d.endpoint)
                .await
                .node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    publish_context,
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(mount_cap()),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("NodeStageVolume: {s}"))?;
            Ok(())
        })
    });
    let attached = Attached {
        volume: id.clone(),
        staging: staging.clone(),
        target: target.clone(),
        node_endpoint: life.driver.endpoint.clone(),
        node_id: life.driver.node_id.clone(),
        publish_context: publish_context.borrow().clone(),
    };
    rt.block_on(publish_target(&attached));
    let data = pattern(7, 4 << 20);
    write_file(&target.join("data"), &data);
    assert!(
        std::fs::read(target.join("data")).expect("read back") == data,
        "the file written through the mount reads back different"
    );
    rt.block_on(detach(&ep, &attached));

    life.call(Step::Delete, &|_| {
        rt.block_on(async {
            controller(&ep)
                .await
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("DeleteVolume: {s}"))?;
            Ok(())
        })
    });
    assert!(life.crashed, "the driver never reached {}", step.point());

    assert_nothing_left(&root, &[life.driver.child.id() as i32]);
    let dirs = replica_dirs(&root, &id);
    assert!(dirs.is_empty(), "replica directories left: {dirs:?}");
}

/// A volume's life on a driver that dies at `step`.
struct Life {
    step: Step,
    driver: Driver,
    root: std::path::PathBuf,
    crashed: bool,
}

impl Life {
    /// Makes call `this` (`f`): once, or when `this` is the step where the
    /// driver dies, until it dies, and then again on a new driver.
    fn call(&mut self, this: Step, f: &dyn Fn(&Driver) -> Result<(), String>) {
        if this != self.step {
            f(&self.driver).unwrap_or_else(|e| panic!("{e}"));
            return;
        }
        let r = f(&self.driver);
        assert!(r.is_err(), "the call survived its crash point");
        self.driver.wait_crashed_at(self.step.point());
        self.driver = Driver::standalone(&self.root, "solo", 3, &[]);
        f(&self.driver).unwrap_or_else(|e| panic!("retried after the crash: {e}"));
        self.crashed = true;
    }
}

/// What is left under `root/disk*/replicas/VOLUME`.
fn replica_dirs(root: &Path, volume: &str) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..3 {
        let dir = root.join(format!("disk{i}")).join("replicas").join(volume);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            out.extend(rd.flatten().map(|e| e.path().display().to_string()));
        }
    }
    out
}

#[test]
fn a_driver_killed_midway_through_create_volume_converges_on_retry() {
    crash_at(Step::Create);
}

#[test]
fn a_driver_killed_midway_through_controller_publish_converges_on_retry() {
    crash_at(Step::Publish);
}

#[test]
fn a_driver_killed_midway_through_node_stage_converges_on_retry() {
    crash_at(Step::Stage);
}

#[test]
fn a_driver_killed_midway_through_delete_volume_converges_on_retry() {
    crash_at(Step::Delete);
}
