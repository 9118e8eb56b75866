//! The container image's file tree, built on this machine by the script
//! the Dockerfile runs (deploy/image-rootfs.sh), and programs run from it
//! as a pod of deploy/daemonset.yaml runs them: that tree as `/`, a fresh
//! `/proc`, the image's `PATH` (deploy/Dockerfile's `ENV PATH=`) and
//! nothing else in the environment, and, when asked, only the
//! capabilities the pod is granted.
//!
//! Each command is `unshare [-n] -m --mount-proc=TREE/proc capsh
//! --chroot=TREE [--drop=…] --shell=PROGRAM -- ARGS`: unshare gives it its
//! own mount namespace (and, without a lab namespace, a fresh network
//! namespace of its own, gone when it exits), capsh enters the tree and
//! takes the other capabilities out of the bounding set, so that the
//! program, run as root, has exactly the kept ones (what `capabilities:
//! {drop: [ALL], add: […]}` gives a container). Needs root, `unshare`
//! (util-linux) and `capsh` (libcap2-bin).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::bin;
use crate::Netns;

/// Every Linux capability, by capsh's names (bits 0 to 40).
pub const CAPABILITIES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

/// The repository's root (this crate is tests/lab).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The image's `PATH`: the `ENV PATH=` of deploy/Dockerfile's last stage.
///
/// # Panics
/// If the Dockerfile sets none there (then `nft` would be looked for in
/// glibc's default `/bin:/usr/bin` only).
pub fn image_path() -> String {
    let dockerfile = repo().join("deploy/Dockerfile");
    let text = fs::read_to_string(&dockerfile)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dockerfile.display()));
    let last_stage = text.rsplit("\nFROM ").next().unwrap_or_default();
    last_stage
        .lines()
        .find_map(|l| l.trim().strip_prefix("ENV PATH="))
        .map(|p| p.trim().trim_matches('"').to_string())
        .expect("deploy/Dockerfile's runtime stage sets `ENV PATH=`")
}

/// What [`build`] made.
#[derive(Debug)]
pub struct Tree {
    /// The image's `/`.
    pub root: PathBuf,
    /// The size of the binary put in it (stripped of its debug sections).
    pub binary_bytes: u64,
}

/// Builds the image's tree at `root` (which must not exist yet) with
/// deploy/image-rootfs.sh, from this machine's packages and the binary
/// under test stripped of its debug sections (`objcopy --strip-debug`:
/// what Cargo's `dist` profile, `strip = "debuginfo"`, builds; the
/// Dockerfile builds that profile), written beside `root`; then what the
/// container runtime adds in `/dev` ([`runtime_dev`]).
///
/// # Panics
/// If `objcopy` or the script fails (with the script's output: it names
/// the program or library that is missing).
pub fn build(root: &Path) -> Tree {
    let parent = root.parent().expect("the tree's directory has a parent");
    let stripped = parent.join("kube-uproxy.dist");
    let out = Command::new("objcopy")
        .args(["--strip-debug", bin()])
        .arg(&stripped)
        .output()
        .expect("running objcopy (binutils)");
    assert!(
        out.status.success(),
        "objcopy --strip-debug: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = repo().join("deploy/image-rootfs.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg(root)
        .arg(&stripped)
        .output()
        .expect("running deploy/image-rootfs.sh");
    assert!(
        out.status.success(),
        "deploy/image-rootfs.sh failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    runtime_dev(root);
    let binary_bytes = fs::metadata(&stripped).expect("the stripped binary").len();
    Tree {
        root: root.to_path_buf(),
        binary_bytes,
    }
}

/// What a container runtime puts in every container's `/dev` (a tmpfs
/// over the image's, runc's defaults) and the proxy and its programs use:
/// `/dev/null` (every child's closed stdin, Rust's `Stdio::null`),
/// `/dev/stdin` (`nft -f /dev/stdin`), the random devices, and the
/// `/proc/self/fd` links. Made here in the tree's `/dev`, which the image
/// leaves empty.
///
/// # Panics
/// If `mknod` fails (e.g. a `nodev` temporary directory).
fn runtime_dev(root: &Path) {
    let dev = root.join("dev");
    fs::create_dir_all(&dev).expect("the tree's /dev");
    for (name, minor) in [
        ("null", "3"),
        ("zero", "5"),
        ("random", "8"),
        ("urandom", "9"),
    ] {
        let out = Command::new("mknod")
            .args(["-m", "666"])
            .arg(dev.join(name))
            .args(["c", "1", minor])
            .output()
            .expect("running mknod");
        assert!(
            out.status.success(),
            "mknod /dev/{name} in the tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name)).expect("a /dev link in the tree");
    }
}

/// Where `program` is in the tree, found along the image's `PATH` as
/// `execvp` would (the path inside the tree); `None` when it is not there.
pub fn find(root: &Path, program: &str) -> Option<String> {
    image_path()
        .split(':')
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .find(|p| {
            // Through the tree's own links (e.g. /sbin -> usr/sbin), which
            // are relative: resolved inside the tree.
            root.join(p.trim_start_matches('/')).exists()
        })
}

/// A command running `program` (found along the image's `PATH`) from the
/// tree at `root`, as described in the [module docs](self): in `ns`, or in
/// a fresh network namespace of its own when `None`; with only the
/// capabilities `caps` (capsh's names, e.g. `cap_net_admin`) when given,
/// else with root's. Add the program's arguments to the returned command.
///
/// # Panics
/// If `program` is not in the tree.
pub fn tree_command(
    ns: Option<&Netns>,
    root: &Path,
    caps: Option<&[&str]>,
    program: &str,
) -> Command {
    let path = find(root, program)
        .unwrap_or_else(|| panic!("{program} is not in the image's tree along its PATH"));
    let mut cmd = match ns {
        Some(ns) => ns.command("unshare"),
        None => {
            let mut c = Command::new("unshare");
            c.arg("-n");
            c
        }
    };
    cmd.arg("-m")
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("capsh")
        .arg(format!("--chroot={}", root.display()));
    if let Some(keep) = caps {
        let drop: Vec<&str> = CAPABILITIES
            .iter()
            .copied()
            .filter(|c| !keep.contains(c))
            .collect();
        cmd.arg(format!("--drop={}", drop.join(",")));
    }
    cmd.arg(format!("--shell={path}"))
        .arg("--")
        .env_clear()
        .env("PATH", image_path());
    cmd
}
