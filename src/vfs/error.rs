//! Errors of the filesystem's operations, and the one place they become errno values: a full
//! disk stays ENOSPC (so `cp` says so), a lost commit race is EAGAIN (retried), a base or an
//! object changed since it was added and every other failure to produce bytes is EIO, with the
//! reason in the log (the FUSE layer writes it). Everything else returns its own module's
//! error and converts here.

use std::io;

use crate::registry;
use crate::variant::{ReadError, ViewError};

/// An errno with the reason, which the FUSE layer logs.
#[derive(Debug)]
pub struct FsError {
    pub errno: i32,
    pub message: Option<String>,
}

impl FsError {
    pub fn new(errno: i32) -> Self {
        FsError { errno, message: None }
    }
    pub fn eio(message: impl Into<String>) -> Self {
        FsError { errno: libc::EIO, message: Some(message.into()) }
    }
}

impl From<ReadError> for FsError {
    fn from(e: ReadError) -> Self {
        FsError::eio(e.to_string())
    }
}

impl From<ViewError> for FsError {
    fn from(e: ViewError) -> Self {
        FsError::eio(e.to_string())
    }
}

impl From<registry::Error> for FsError {
    fn from(e: registry::Error) -> Self {
        registry_fs(e)
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// The errno of an I/O error: a full disk (or quota) is ENOSPC, anything else EIO.
pub(super) fn errno_of(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
        _ => libc::EIO,
    }
}

/// An I/O error of `what` (staging, the store).
pub(super) fn io_fs(what: &str, e: io::Error) -> FsError {
    FsError { errno: errno_of(&e), message: Some(format!("{what}: {e}")) }
}

/// A registry error as an errno: a full disk stays ENOSPC, a lost commit race is EAGAIN (the
/// write path retries it), anything else is EIO.
pub(super) fn registry_fs(e: registry::Error) -> FsError {
    match &e {
        registry::Error::Io { source, .. } => {
            FsError { errno: errno_of(source), message: Some(e.to_string()) }
        }
        registry::Error::Conflict => FsError { errno: libc::EAGAIN, message: Some(e.to_string()) },
        _ => FsError::eio(e.to_string()),
    }
}
