//! Why a session change was refused. Every refusal changed nothing.

use std::{net::IpAddr, path::PathBuf};

use thiserror::Error;
use time::OffsetDateTime;

use crate::{
    datapath::DatapathError,
    input::{AddressError, NameProblem},
};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(
        "device {ip} is bound to user {current:?}; {requested:?} cannot log in on it until it is logged out (one user per device)"
    )]
    OtherUser {
        ip: IpAddr,
        current: String,
        requested: String,
    },
    #[error(
        "device {ip} enrolled through IdP {enrolled:?}; its session resets only through that IdP, not {requested:?}"
    )]
    WrongIdp {
        ip: IpAddr,
        enrolled: String,
        requested: String,
    },
    #[error("authentication time {at} is in the future (agent clock: {now})")]
    InFuture {
        at: OffsetDateTime,
        now: OffsetDateTime,
    },
    #[error("no session for device {ip}")]
    NotFound { ip: IpAddr },
    /// `value` is the name as `input::name::preview` shows it.
    #[error("{field} {value} is invalid: {reason}")]
    InvalidName {
        field: &'static str,
        value: String,
        reason: NameProblem,
    },
    #[error(transparent)]
    NotADevice(#[from] AddressError),
    #[error("session state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the session journal {path} is out of space ({source}); the change was undone. Free space on its file system (or raise the quota), then retry"
    )]
    JournalFull {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the change could not be written to the session journal {path} ({source}) and was undone; check the disk and the file's permissions, then retry"
    )]
    NotRecorded {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the session journal in {dir} could not be made durable ({reason}); the change was undone. Check the disk and the kernel log, then retry"
    )]
    NotDurable { dir: PathBuf, reason: String },
}

impl SessionError {
    /// A failed journal write: out of space, or another failure.
    pub(super) fn not_recorded(path: PathBuf, source: std::io::Error) -> Self {
        let full = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
        );
        if full {
            Self::JournalFull { path, source }
        } else {
            Self::NotRecorded { path, source }
        }
    }

    /// A stable machine-readable code for API clients.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::OtherUser { .. } => "other_user",
            Self::WrongIdp { .. } => "wrong_idp",
            Self::InFuture { .. } => "in_future",
            Self::NotFound { .. } => "not_found",
            Self::InvalidName { .. } | Self::NotADevice(_) => "invalid",
            Self::JournalFull { .. } => "storage_full",
            Self::NotRecorded { .. } | Self::NotDurable { .. } => "journal_unavailable",
            Self::Io { .. } => "state_error",
        }
    }
}

/// A session change refused by the rules, the journal or the kernel; nothing changed.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Kernel(#[from] DatapathError),
}
