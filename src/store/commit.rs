//! Atomic read-modify-write of one object (the registry), and the probe that makes it safe.
//!
//! On S3 an update is optimistic: read the object and its etag, apply the caller's closure,
//! write with If-Match (If-None-Match: * when there was none); if another process committed in
//! between, the write fails with 412 and the whole cycle repeats on the new content, after a
//! jittered backoff (5 ms doubling to 500 ms), for up to [`MAX_COMMIT_TIME`]. N processes
//! updating at once therefore each commit exactly once and lose nothing, and a reader only ever
//! sees a whole object (S3 PUTs are atomic). The local directory does the same cycle under its
//! exclusive `flock`, so it never conflicts.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::{Cond, Store, StoreError};

/// How long [`update_object`] keeps retrying against concurrent writers before
/// [`StoreError::Contention`]. Each cycle is two requests; a minute is hundreds of commits by
/// others, far more than llmfs's catalogue ever sees.
pub const MAX_COMMIT_TIME: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A committed update: the bytes now stored and their etag.
#[derive(Clone, Debug)]
pub struct Committed {
    pub bytes: Vec<u8>,
    pub etag: String,
    /// Whether anything was written (false when the closure returned the bytes unchanged).
    pub written: bool,
    /// Read-modify-write cycles it took (1 without contention).
    pub attempts: u32,
}

/// Why an update did not commit: the store failed, or the closure refused (its error, as is).
#[derive(Debug)]
pub enum UpdateError<E> {
    Store(StoreError),
    Rejected(E),
}

impl<E: fmt::Display> fmt::Display for UpdateError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateError::Store(e) => e.fmt(f),
            UpdateError::Rejected(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for UpdateError<E> {}

impl<E> From<StoreError> for UpdateError<E> {
    fn from(e: StoreError) -> Self {
        UpdateError::Store(e)
    }
}

/// Replaces object `key` with `f(current bytes)` atomically (`None` when there is no object
/// yet). `f` may run several times (once per conflicting commit by someone else), always on the
/// latest bytes, so it must be a pure function of them. Returning the bytes unchanged writes
/// nothing.
pub fn update_object<E>(
    store: &Store,
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, E>,
) -> Result<Committed, UpdateError<E>> {
    store.write_check(key)?;
    if let Some(local) = store.local_backend() {
        let mut rejected = None;
        let mut apply = |old: Option<&[u8]>| match f(old) {
            Ok(new) if old == Some(&new[..]) => Ok(None),
            Ok(new) => Ok(Some(new)),
            Err(e) => {
                rejected = Some(e);
                Err(StoreError::Io { key: key.into(), reason: "update rejected".into() })
            }
        };
        let outcome = local.update(key, &mut apply);
        if let Some(e) = rejected {
            return Err(UpdateError::Rejected(e));
        }
        let (bytes, etag, written) = outcome?;
        return Ok(Committed { bytes, etag, written, attempts: 1 });
    }

    retry_update(store, key, f, &mut |key, bytes, cond| store.put_cond(key, bytes, cond))
}

/// The optimistic cycle of [`update_object`]: read, apply `f`, write with `put` on the condition
/// that nothing changed since the read, and on a conflict repeat after a jittered backoff, for
/// up to [`MAX_COMMIT_TIME`]. Unchanged bytes write nothing.
pub(super) fn retry_update<E>(
    store: &Store,
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, E>,
    put: &mut dyn FnMut(&str, Bytes, Cond) -> Result<String, StoreError>,
) -> Result<Committed, UpdateError<E>> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let current = match store.get(key) {
            Ok(o) => Some(o),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let new = f(current.as_ref().map(|o| &o.bytes[..])).map_err(UpdateError::Rejected)?;
        let written = match &current {
            Some(cur) if cur.bytes[..] == new[..] => {
                return Ok(Committed { bytes: new, etag: cur.etag.clone(), written: false, attempts })
            }
            Some(cur) => put(key, Bytes::from(new.clone()), Cond::Match(&cur.etag)),
            None => put(key, Bytes::from(new.clone()), Cond::Absent),
        };
        match written {
            Ok(etag) => return Ok(Committed { bytes: new, etag, written: true, attempts }),
            Err(StoreError::Precondition { .. } | StoreError::AlreadyExists { .. }) => {
                if start.elapsed() >= MAX_COMMIT_TIME {
                    return Err(StoreError::Contention { key: key.into(), attempts }.into());
                }
                std::thread::sleep(backoff(attempts));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Full jitter over an exponential ceiling, so that the losers of one round do not collide
/// again in lockstep.
pub(super) fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
    let nanos = ceiling.as_nanos() as u64;
    Duration::from_nanos(nanos / 2 + random() % (nanos / 2 + 1))
}

/// A random u64 from the std hasher's per-instance random keys (no RNG dependency).
fn random() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// The conditional-write probe (see `store`'s module doc), on a key of its own. `Ok` for a
/// server that honours both preconditions; [`StoreError::NoConditionalWrites`] for one that
/// does not; any other error (server unreachable) as is.
pub(super) fn probe(store: &Store) -> Result<(), StoreError> {
    if store.is_local() {
        return Ok(()); // link(2) and flock: see local.rs
    }
    let key = format!(".llmfs-probe/{}-{:016x}", std::process::id(), random());
    let refuse =
        |detail: &str| StoreError::NoConditionalWrites { location: store.location(), detail: detail.into() };
    let outcome = (|| {
        store.put_cond(&key, Bytes::from_static(b"llmfs conditional-write probe 1"), Cond::Absent)?;
        match store.put_cond(&key, Bytes::from_static(b"llmfs conditional-write probe 2"), Cond::Absent) {
            Err(StoreError::AlreadyExists { .. }) => {}
            Ok(_) => return Err(refuse("a PUT with If-None-Match: * replaced an existing object")),
            Err(e) => return Err(e),
        }
        let etag = store.head(&key)?.etag;
        let wrong = "\"llmfs-probe-wrong-etag\"";
        match store.put_cond(&key, Bytes::from_static(b"llmfs conditional-write probe 3"), Cond::Match(wrong))
        {
            Err(StoreError::Precondition { .. }) => {}
            Ok(_) => return Err(refuse("a PUT with If-Match and a wrong etag was accepted")),
            Err(e) => return Err(e),
        }
        match store.put_cond(&key, Bytes::from_static(b"llmfs conditional-write probe 4"), Cond::Match(&etag))
        {
            Ok(_) => Ok(()),
            Err(StoreError::Precondition { .. }) => {
                Err(refuse("a PUT with If-Match and the right etag was refused"))
            }
            Err(e) => Err(e),
        }
    })();
    let _ = store.delete_unchecked(&key);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        for attempt in 1..40 {
            let b = backoff(attempt);
            let ceiling = BACKOFF_START.saturating_mul(1 << attempt.min(16)).min(BACKOFF_MAX);
            assert!(b >= ceiling / 2 && b <= ceiling, "attempt {attempt}: {b:?}");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(10)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[test]
    fn local_updates_from_many_threads_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::local(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        update_object(&store, "registry.json", |old| {
                            let mut v = old.unwrap_or_default().to_vec();
                            v.extend_from_slice(format!("{t}-{i}\n").as_bytes());
                            Ok::<_, String>(v)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = store.get("registry.json").unwrap();
        let lines: std::collections::HashSet<_> = std::str::from_utf8(&got.bytes).unwrap().lines().collect();
        assert_eq!(lines.len(), 160);
    }

    #[test]
    fn a_rejected_or_unchanged_update_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::local(dir.path()).unwrap();
        let c = update_object(&store, "r", |_| Ok::<_, String>(b"v1".to_vec())).unwrap();
        assert!(c.written);
        let same = update_object(&store, "r", |old| Ok::<_, String>(old.unwrap().to_vec())).unwrap();
        assert!(!same.written);
        assert_eq!(same.etag, c.etag);
        match update_object(&store, "r", |_| Err("no".to_string())) {
            Err(UpdateError::Rejected(e)) => assert_eq!(e, "no"),
            other => panic!("{other:?}"),
        }
        assert_eq!(&store.get("r").unwrap().bytes[..], b"v1");
    }
}
