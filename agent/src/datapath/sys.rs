//! The bpf(2) commands aya 0.14 does not offer. `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_LOOKUP_BATCH`: one syscall writes or reads thousands of elements where
//! per-element calls cost one each (loading a million sessions at start-up, counting
//! tracked flows for every metrics scrape). `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` on
//! a pinned link: which interface it is attached to. And `MappedArray`: an ARRAY
//! created with `BPF_F_MMAPABLE`, read and written in its own memory.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `enum bpf_cmd`.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Elements per syscall: large enough to amortise it, small enough to keep the kernel's
/// copy of keys and values modest.
const CHUNK: usize = 16_384;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// bpf(2) with `attr` as the command's member of `union bpf_attr`: the syscall's result,
/// or the error it set.
///
/// # Safety
/// `attr` must be a valid attr for `cmd`: every pointer in it valid for the kernel to
/// read or write as the command does, and every byte past its last field zero.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Writes `keys[i] -> values[i]` for every `i` (BPF_ANY). A large batch is split into
/// one part per CPU (at most `MAX_WRITERS`), written at once: the elements are
/// independent, and the kernel's per-bucket locks and per-CPU allocators let the parts
/// go in parallel (a million sessions at start-up). On error, any part may be written.
pub fn update_batch<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let writers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_WRITERS);
    if keys.len() < PARALLEL_ABOVE || writers < 2 {
        return update_chunks(map, keys, values);
    }
    let part = keys.len().div_ceil(writers);
    std::thread::scope(|scope| {
        let parts: Vec<_> = keys
            .chunks(part)
            .zip(values.chunks(part))
            .map(|(keys, values)| scope.spawn(move || update_chunks(map, keys, values)))
            .collect();
        parts
            .into_iter()
            .try_for_each(|part| part.join().expect("a batch writer panicked"))
    })
}

/// Batches at least this large are written by several threads.
const PARALLEL_ABOVE: usize = 4 * CHUNK;
/// Threads writing one batch.
const MAX_WRITERS: usize = 4;

/// `update_batch` on one thread, `CHUNK` elements per syscall.
fn update_chunks<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys and values of the map's sizes (the
        // caller's typed map guarantees the sizes), alive for the call.
        unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
    }
    Ok(())
}

/// Reads every element of an ARRAY map of `V`, a chunk at a time, handing each chunk
/// to `each`.
pub fn read_array<V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&[V]),
) -> io::Result<()> {
    read_map::<u32, V>(map, |_, values| each(values))
}

/// Reads every element of an ARRAY or HASH map, a chunk of keys and values at a time.
/// Both kinds take a `u32` batch cursor.
pub fn read_map<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&[K], &[V]),
) -> io::Result<()> {
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const next) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the buffers hold `count` keys and values of the map's sizes (the
        // caller's typed map guarantees them); `next` is the u32 batch cursor array and
        // hash maps use. All alive for the call.
        let done = match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            // The end of the map; `count` says how many elements came with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = attr.count as usize;
        each(&keys[..n], &values[..n]);
        if done {
            return Ok(());
        }
        first = false;
    }
}

/// The interface index a pinned XDP link is attached to: 0 once its interface is gone
/// (deleted, or recreated under the same name with a new index).
pub fn link_ifindex(path: &Path) -> io::Result<u32> {
    /// `struct bpf_link_info`: type, id, prog_id, then a union (8-byte aligned) whose
    /// `xdp.ifindex` comes first.
    const XDP_IFINDEX_OFFSET: usize = 16;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // Zeroed as a whole: the kernel refuses an attr whose bytes past the last field
    // (here, the struct's tail padding) are not zero.
    // SAFETY: all-zero is a valid ObjGet.
    let mut get: ObjGet = unsafe { std::mem::zeroed() };
    get.pathname = c_path.as_ptr() as u64;
    // SAFETY: a zeroed attr for BPF_OBJ_GET pointing at a NUL-terminated path.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    // SAFETY: the kernel just returned this fd to us; it is closed on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u8; 64];
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` is a writable buffer of `info_len` bytes, alive for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let bytes: [u8; 4] = info[XDP_IFINDEX_OFFSET..XDP_IFINDEX_OFFSET + 4]
        .try_into()
        .expect("four bytes");
    Ok(u32::from_ne_bytes(bytes))
}

/// A shared mapping of an ARRAY map created with `BPF_F_MMAPABLE`: its elements read
/// and written in place, without a syscall (or a copy through the kernel) each. A
/// million tracked flows are counted, and a million sessions' buckets placed, in
/// milliseconds. Held for one bulk operation only, so that the pages never count
/// towards the agent's resident memory. The program reads and writes the same memory
/// meanwhile: elements are copied in and out whole, and a torn one is caught by its
/// check word, as with the kernel's own copy in `BPF_MAP_UPDATE_BATCH`.
pub struct MappedArray<V> {
    base: std::ptr::NonNull<V>,
    len: usize,
    writable: bool,
}

impl<V: aya::Pod> MappedArray<V> {
    pub fn open(map: &aya::maps::MapData, writable: bool) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        if info.map_flags() & aya_obj::generated::BPF_F_MMAPABLE == 0
            || info.value_size() as usize != size_of::<V>()
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an mmapable array of this value size",
            ));
        }
        let len = info.max_entries() as usize;
        let protection = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's values (an mmapable array lays
        // them out back to back from offset 0); it is unmapped on drop and never handed
        // out beyond `get` and `set`'s copies.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (len * size_of::<V>()).max(1),
                protection,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: std::ptr::NonNull::new(base.cast()).expect("mmap returned null"),
            len,
            writable,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// A copy of element `index`.
    pub fn get(&self, index: usize) -> V {
        assert!(
            index < self.len,
            "index {index} beyond the map's {}",
            self.len
        );
        // SAFETY: within the mapping; volatile, as the program may write it meanwhile.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(index)) }
    }

    /// Asks the CPU to start loading element `index`, about to be read (a hint).
    pub fn prefetch(&self, index: usize) {
        if index < self.len {
            crate::memory::prefetch(self.base.as_ptr().wrapping_add(index));
        }
    }

    pub fn set(&mut self, index: usize, value: V) {
        assert!(self.writable, "a read-only mapping");
        assert!(
            index < self.len,
            "index {index} beyond the map's {}",
            self.len
        );
        // SAFETY: within a writable mapping; volatile, as the program reads it meanwhile.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(index), value) }
    }
}

impl<V> Drop for MappedArray<V> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of this length; no copy of its address
        // outlives `self`.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                (self.len * size_of::<V>()).max(1),
            )
        };
    }
}
