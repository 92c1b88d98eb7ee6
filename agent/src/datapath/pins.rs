//! Where the pinned datapath lives in bpffs, so that it outlives the agent: a directory
//! per map layout (`{pin_dir}/layout-{LAYOUT}`) holding the program, every map and one
//! link per interface. An agent adopts the pins of its own layout and refuses any other
//! (`--replace` swaps them).
//!
//! ```text
//! {pin_dir}/layout-3/program
//! {pin_dir}/layout-3/portal-program
//! {pin_dir}/layout-3/maps/SG_SETTINGS ...
//! {pin_dir}/layout-3/links/eth0:native     (XDP; or eth0:generic)
//! {pin_dir}/layout-3/links/eth0:portal     (the portal's TC program, when enabled)
//! ```

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

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf if that is where it
/// should be and none is mounted (it is not, at boot, on many distributions).
pub fn ensure_bpffs(pin_dir: &Path) -> io::Result<()> {
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && !is_bpffs(default) {
        fs::create_dir_all(default)?;
        let (src, target, fstype) = (
            CString::new("bpf").expect("no NUL"),
            CString::new(default.as_os_str().as_bytes()).expect("no NUL"),
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
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    fs::create_dir_all(pin_dir)?;
    if !is_bpffs(pin_dir) {
        return Err(io::Error::other(format!(
            "{} is not on a bpf filesystem (mount -t bpf bpf DIR)",
            pin_dir.display()
        )));
    }
    Ok(())
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
