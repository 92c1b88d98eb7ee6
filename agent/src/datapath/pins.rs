//! Where the pinned datapath lives in bpffs, so that it outlives the agent: a directory
//! per map layout (`{pin_dir}/layout-{LAYOUT}`) holding the program, every map and one
//! link per interface. An agent adopts the pins of its own layout and refuses any other
//! (`--replace` swaps them).
//!
//! ```text
//! {pin_dir}/layout-4/program
//! {pin_dir}/layout-4/portal-program
//! {pin_dir}/layout-4/maps/SG_SETTINGS ...
//! {pin_dir}/layout-4/links/eth0:native     (XDP; or eth0:generic)
//! {pin_dir}/layout-4/links/eth0:portal     (the portal's TC program, when enabled)
//! ```
//!
//! Pins outlive the agent only on a bpffs that outlives it. An agent started in a
//! private mount namespace (`ip netns exec` makes one, with a fresh /sys) would mount a
//! bpffs of its own at /sys/fs/bpf, which goes when the namespace does, and the
//! datapath with it: there, a `pin_dir` under /sys/fs/bpf is reached on the host's
//! bpffs through pid 1's root (`locate`).

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use agent_common::maps::LAYOUT;

/// `statfs.f_type` of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directories of one layout.
#[derive(Clone, Debug)]
pub struct LayoutDir {
    pub root: PathBuf,
}

impl LayoutDir {
    /// This build's layout under `pin_dir`.
    pub fn current(pin_dir: &Path) -> Self {
        Self::named(pin_dir, &layout_name(LAYOUT))
    }

    fn named(pin_dir: &Path, name: &str) -> Self {
        Self {
            root: pin_dir.join(name),
        }
    }

    /// A staging directory next to `current`, for `--replace`.
    pub fn staging(pin_dir: &Path) -> Self {
        Self::named(pin_dir, &format!("{}-new", layout_name(LAYOUT)))
    }

    pub fn program(&self) -> PathBuf {
        self.root.join("program")
    }

    /// The portal's TC program.
    pub fn portal_program(&self) -> PathBuf {
        self.root.join("portal-program")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(interface)
    }

    pub fn exists(&self) -> bool {
        self.program().exists()
    }

    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(self.root.join("maps"))?;
        fs::create_dir_all(self.root.join("links"))
    }

    /// Interfaces with a pinned link.
    pub fn linked_interfaces(&self) -> Vec<String> {
        fs::read_dir(self.root.join("links"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes every pin (detaching links whose last reference this was) and the
    /// directories.
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

fn layout_name(layout: u32) -> String {
    format!("layout-{layout}")
}

/// Pinned layouts under `pin_dir` other than this build's.
pub fn other_layouts(pin_dir: &Path) -> Vec<LayoutDir> {
    let current = layout_name(LAYOUT);
    fs::read_dir(pin_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("layout-") && *name != current)
                .map(|name| LayoutDir::named(pin_dir, &name))
                .collect()
        })
        .unwrap_or_default()
}

const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Where pins under `pin_dir` really live: `pin_dir` itself, or, for an agent in a
/// private mount namespace with no bpffs at /sys/fs/bpf, the same path on the host's
/// filesystem (through `/proc/{pid}/root` of a process in the host's namespace).
pub fn locate(pin_dir: &Path) -> PathBuf {
    match rerouted(pin_dir) {
        Some((host, _)) => host,
        None => pin_dir.to_path_buf(),
    }
}

/// `pin_dir` on the host's filesystem, and the host's `/proc/{pid}`, when pins under
/// it must not go to this mount namespace.
fn rerouted(pin_dir: &Path) -> Option<(PathBuf, PathBuf)> {
    if !pin_dir.starts_with(DEFAULT_BPFFS) || is_bpffs(Path::new(DEFAULT_BPFFS)) {
        return None;
    }
    let host = host_process()?;
    let relative = pin_dir.strip_prefix("/").unwrap_or(pin_dir);
    Some((host.join("root").join(relative), host))
}

/// `/proc/{pid}` of a process in the host's mount namespace, if this process is not
/// in it: pid 1, or kthreadd (pid 2) where pid 1 may not be inspected (some sandboxes).
fn host_process() -> Option<PathBuf> {
    let mine = fs::read_link("/proc/self/ns/mnt").ok()?;
    let host = [1, 2].into_iter().find_map(|pid| {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let ns = fs::read_link(proc.join("ns/mnt")).ok()?;
        Some((proc, ns))
    });
    match host {
        Some((proc, ns)) if ns != mine => Some(proc),
        _ => None,
    }
}

/// Makes sure pins under `pin_dir` go to a bpffs that outlives this process, mounting
/// one at /sys/fs/bpf (on the host) if that is where they belong and none is mounted
/// (at boot it is not, on many distributions). Returns where they go (`locate`).
pub fn ensure_bpffs(pin_dir: &Path) -> io::Result<PathBuf> {
    let default = Path::new(DEFAULT_BPFFS);
    let located = match rerouted(pin_dir) {
        Some((located, host)) => {
            if !is_bpffs(&host.join("root/sys/fs/bpf")) {
                mount_in_namespace_of(&host, default)?;
                tracing::info!("mounted bpffs at /sys/fs/bpf on the host");
            }
            tracing::info!(
                pin_dir = %pin_dir.display(),
                "this agent runs in a private mount namespace (as `ip netns exec` makes), where a bpffs of its own would vanish with it: pinning on the host's bpffs instead, through {}",
                host.join("root").display()
            );
            located
        }
        None => {
            if pin_dir.starts_with(default) && !is_bpffs(default) {
                fs::create_dir_all(default)?;
                mount_bpffs(default)?;
                tracing::info!("mounted bpffs at /sys/fs/bpf");
            }
            pin_dir.to_path_buf()
        }
    };
    fs::create_dir_all(&located)?;
    if !is_bpffs(&located) {
        return Err(io::Error::other(format!(
            "{} is not on a bpf filesystem (mount -t bpf bpf DIR)",
            located.display()
        )));
    }
    Ok(located)
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let (src, target, fstype) = (
        CString::new("bpf").expect("no NUL"),
        CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?,
        CString::new("bpf").expect("no NUL"),
    );
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a bpffs at `target` in the mount namespace of `/proc/{pid}`, from a thread of
/// its own that joins that namespace (which needs its own filesystem attributes first).
fn mount_in_namespace_of(proc: &Path, target: &Path) -> io::Result<()> {
    let ns = fs::File::open(proc.join("ns/mnt"))?;
    let target = target.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: unshare and setns affect only this thread, which ends right after.
        unsafe {
            if libc::unshare(libc::CLONE_FS) != 0
                || libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNS) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        fs::create_dir_all(&target)?;
        mount_bpffs(&target)
    })
    .join()
    .map_err(|_| io::Error::other("the mount thread panicked"))?
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}
