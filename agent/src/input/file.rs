//! Files the agent reads whole (the config, the API token, TLS certificates and keys,
//! import files): opened without blocking, and read only if they are what they should
//! be and no larger than a bound, so that a FIFO cannot hang the agent and `/dev/zero`
//! cannot fill its memory.

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

use thiserror::Error;

/// The token and TLS files are small: this is far beyond any real one.
pub const MAX_SMALL_FILE: u64 = 1 << 20;
/// A config may hold up to 16,384 policies with their destinations (a 10,000-policy
/// config is over 1 MiB): this leaves room for the largest a config can be.
pub const MAX_CONFIG_FILE: u64 = 64 << 20;

/// What a file may be besides a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    RegularFile,
    /// A regular file or a pipe (`session import <(generate)`), read up to the bound.
    RegularFileOrPipe,
}

#[derive(Debug, Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("it is {kind}, not a regular file; name the file itself")]
    NotRegular { kind: &'static str },
    #[error(
        "it is larger than {limit} bytes, more than such a file can need; is this the right file?"
    )]
    TooLarge { limit: u64 },
    #[error("it is not UTF-8 text")]
    NotText,
}

/// A file's bytes and its mode bits (as found on the open file, not the path).
#[derive(Debug)]
pub struct Content {
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// Why a secret's file (a token, a client secret) cannot be used.
#[derive(Debug, Error)]
pub enum SecretError {
    #[error(transparent)]
    Unreadable(#[from] FileError),
    #[error("it is readable by group or others (mode {mode:o})")]
    Exposed { mode: u32 },
    #[error("it is not UTF-8 text")]
    NotText,
}

/// A secret's text without surrounding whitespace, from a regular file of at most
/// `limit` bytes that only its owner may read (the mode of the open file).
pub fn read_secret(path: &Path, limit: u64) -> Result<String, SecretError> {
    let content = read_bounded(path, limit, Accept::RegularFile)?;
    if content.mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            mode: content.mode & 0o777,
        });
    }
    let text = String::from_utf8(content.bytes).map_err(|_| SecretError::NotText)?;
    Ok(text.trim().to_string())
}

/// Reads a whole file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64, accept: Accept) -> Result<Content, FileError> {
    // Non-blocking, so that opening a FIFO with no writer returns at once.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let pipe = kind.is_fifo();
    if !(kind.is_file() || pipe && accept == Accept::RegularFileOrPipe) {
        let kind = if kind.is_dir() {
            "a directory"
        } else if pipe {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(FileError::NotRegular { kind });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { limit });
    }
    if pipe {
        blocking(&file)?;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte more than allowed tells a file that grew (or a pipe that goes on).
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok(Content {
        bytes,
        mode: meta.mode(),
    })
}

/// `read_bounded` for text.
pub fn read_text(path: &Path, limit: u64, accept: Accept) -> Result<String, FileError> {
    String::from_utf8(read_bounded(path, limit, accept)?.bytes).map_err(|_| FileError::NotText)
}

/// Clears O_NONBLOCK, so that a pipe is read as its writer writes.
fn blocking(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0
        // SAFETY: as above.
        || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::fs::PermissionsExt, time::Instant};

    use super::*;

    #[test]
    fn a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "hello").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let content = read_bounded(&path, 5, Accept::RegularFile).unwrap();
        assert_eq!(content.bytes, b"hello");
        assert_eq!(content.mode & 0o777, 0o640);
        assert!(matches!(
            read_bounded(&path, 4, Accept::RegularFile),
            Err(FileError::TooLarge { limit: 4 })
        ));
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        for (path, kind) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
            (Path::new("/dev/null"), "character device"),
            (dir.path(), "directory"),
        ] {
            let e = read_bounded(path, MAX_SMALL_FILE, Accept::RegularFile).unwrap_err();
            assert!(e.to_string().contains(kind), "{}: {e}", path.display());
        }
        assert!(started.elapsed().as_secs() < 2, "nothing blocks");
        // Import files may come through a pipe; a device is still refused.
        assert!(read_bounded(Path::new("/dev/zero"), 10, Accept::RegularFileOrPipe).is_err());
    }

    #[test]
    fn a_pipe_is_read_up_to_the_limit() {
        use std::os::fd::AsRawFd;
        // As `session import <(generate)` names it: /dev/fd/N.
        let pipe = |data: &[u8]| {
            let (reader, mut writer) = std::io::pipe().unwrap();
            writer.write_all(data).unwrap();
            drop(writer);
            let path = format!("/proc/self/fd/{}", reader.as_raw_fd());
            (reader, path)
        };
        let (_reader, path) = pipe(&[b'x'; 100]);
        let content = read_bounded(Path::new(&path), 100, Accept::RegularFileOrPipe).unwrap();
        assert_eq!(content.bytes.len(), 100);
        let (_reader, path) = pipe(&[b'x'; 101]);
        assert!(matches!(
            read_bounded(Path::new(&path), 100, Accept::RegularFileOrPipe),
            Err(FileError::TooLarge { limit: 100 })
        ));
        let (_reader, path) = pipe(b"x");
        assert!(matches!(
            read_bounded(Path::new(&path), 100, Accept::RegularFile),
            Err(FileError::NotRegular { .. })
        ));
    }

    #[test]
    fn text_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            read_text(&path, 10, Accept::RegularFile),
            Err(FileError::NotText)
        ));
    }
}
