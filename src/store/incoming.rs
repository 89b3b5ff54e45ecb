//! A local copy of an object that can be read while it is being fetched: [`Incoming`].
//!
//! A cold load used to fetch each object whole before decoding any of it, so the fetch and the
//! decode ran in series. Here the fetch writes its parts into the local file as they come (in
//! file order as it happens, any order is fine) and records each part's byte range in
//! [`Arrivals`]; a reader of a range waits on a condvar until that range has arrived, then
//! reads the file with `pread`. The decoders therefore start on the first tensors while later
//! parts are still in flight.
//!
//! A wait never outlives the fetch: the fetch ends by [`Arrivals::finish`] (its outcome), which
//! wakes every waiter, and a fetch dropped without finishing (a panic) finishes with an error
//! ([`FinishGuard`]). Every GET of the fetch is bounded by the store's deadline, so a dead
//! server fails the fetch, which fails the waiters; nothing polls.
//!
//! Bytes that arrived are the object's at its recorded etag (every part's GET is pinned to it),
//! so a range that arrived before a failure is still served; a range that had not fails with the
//! fetch's error. Whether a failed copy is kept anywhere is the fetcher's business (the mount's
//! disk cache commits only a complete fetch).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex, OnceLock};

use super::ObjectError;

/// Which byte ranges of an object of known size have arrived, and how its fetch ended.
#[derive(Debug)]
pub struct Arrivals {
    size: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Disjoint, sorted, merged ranges that have arrived.
    have: Vec<Range<u64>>,
    /// Set once, when the fetch ends.
    outcome: Option<Result<(), ObjectError>>,
}

impl State {
    fn covers(&self, r: &Range<u64>) -> bool {
        r.start >= r.end || self.have.iter().any(|h| h.start <= r.start && r.end <= h.end)
    }

    fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        // Keep `have` merged: take out every range touching `r`, put back their union.
        let (mut lo, mut hi) = (r.start, r.end);
        self.have.retain(|h| {
            let touches = h.start <= hi && lo <= h.end;
            if touches {
                lo = lo.min(h.start);
                hi = hi.max(h.end);
            }
            !touches
        });
        let at = self.have.partition_point(|h| h.start < lo);
        self.have.insert(at, lo..hi);
    }
}

impl Arrivals {
    /// Nothing has arrived yet of an object of `size` bytes.
    pub fn new(size: u64) -> Self {
        Arrivals { size, state: Mutex::default(), changed: Condvar::new() }
    }

    /// Every byte is there already (a copy fetched before).
    pub fn whole(size: u64) -> Self {
        let a = Arrivals::new(size);
        a.finish(Ok(()));
        a
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes `r` are in the local copy now.
    pub fn arrived(&self, r: Range<u64>) {
        self.lock().insert(r.start..r.end.min(self.size));
        self.changed.notify_all();
    }

    /// The fetch ended: every byte is there (`Ok`), or it failed. Only the first outcome counts.
    pub fn finish(&self, outcome: Result<(), ObjectError>) {
        let mut st = self.lock();
        if st.outcome.is_some() {
            return;
        }
        if outcome.is_ok() {
            st.insert(0..self.size);
        }
        st.outcome = Some(outcome);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until bytes `r` have arrived (`Ok`) or the fetch has ended without them (its
    /// error). A range past the end of the object is an error at once, not a wait.
    pub fn wait_for(&self, r: Range<u64>) -> Result<(), ObjectError> {
        if r.end > self.size {
            return Err(ObjectError::Unavailable(format!(
                "bytes {}..{} asked of an object of {} bytes",
                r.start, r.end, self.size
            )));
        }
        let mut st = self.lock();
        loop {
            if st.covers(&r) {
                return Ok(());
            }
            match &st.outcome {
                Some(Err(e)) => return Err(e.clone()),
                Some(Ok(())) => unreachable!("a finished fetch covers the whole object"),
                None => st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// Waits for the whole object.
    pub fn wait_all(&self) -> Result<(), ObjectError> {
        self.wait_for(0..self.size)
    }

    /// The fetch's outcome if it has ended.
    pub fn outcome(&self) -> Option<Result<(), ObjectError>> {
        self.lock().outcome.clone()
    }
}

/// Finishes `arrivals` with an error when dropped before [`FinishGuard::finish`]: a fetch that
/// stops any other way (a panic) still wakes its waiters.
pub struct FinishGuard<'a>(pub &'a Arrivals);

impl FinishGuard<'_> {
    pub fn finish(self, outcome: Result<(), ObjectError>) {
        self.0.finish(outcome);
    }
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        self.0.finish(Err(ObjectError::Unavailable("the fetch stopped before it ended".into())));
    }
}

/// A local copy of one object, whole or on its way: the file (set by the fetch before it
/// records any byte) and what has arrived of it.
#[derive(Debug)]
pub struct Incoming {
    file: OnceLock<File>,
    pub arrivals: Arrivals,
}

impl Incoming {
    /// A copy whose fetch has not started: the fetcher calls [`Incoming::set_file`], then
    /// [`Arrivals::arrived`] per part, then [`Arrivals::finish`].
    pub fn new(size: u64) -> Self {
        Incoming { file: OnceLock::new(), arrivals: Arrivals::new(size) }
    }

    /// A copy fetched before: `file` holds every byte.
    pub fn whole(file: File, size: u64) -> Self {
        Incoming { file: OnceLock::from(file), arrivals: Arrivals::whole(size) }
    }

    /// The file the fetch writes (the first call wins: a racing second fetch of the same object
    /// would not get here, the callers are single-flight).
    pub fn set_file(&self, file: File) {
        let _ = self.file.set(file);
    }

    /// Reads exactly `buf.len()` bytes at `offset`, once they have arrived.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ObjectError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.arrivals.wait_for(offset..offset.saturating_add(buf.len() as u64))?;
        let file = self.file.get().ok_or_else(|| {
            ObjectError::Unavailable("bytes recorded as arrived before the local copy was made".into())
        })?;
        file.read_exact_at(buf, offset).map_err(|e| ObjectError::Unavailable(format!("local copy: {e}")))
    }

    /// The file once every byte has arrived.
    pub fn whole_file(&self) -> Result<&File, ObjectError> {
        self.arrivals.wait_all()?;
        self.file.get().ok_or_else(|| ObjectError::Unavailable("fetched, but no local copy".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn parts_arriving_out_of_order_merge_and_cover() {
        let a = Arrivals::new(100);
        a.arrived(40..60);
        a.arrived(0..10);
        a.arrived(80..100);
        assert_eq!(a.lock().have, vec![0..10, 40..60, 80..100]);
        a.arrived(10..40);
        assert_eq!(a.lock().have, vec![0..60, 80..100]);
        assert!(a.lock().covers(&(5..60)));
        assert!(!a.lock().covers(&(50..90)));
        a.arrived(55..85);
        assert_eq!(a.lock().have, vec![0..100]);
        a.wait_all().unwrap();
        assert!(a.wait_for(90..101).is_err(), "past the end is an error, not a wait");
    }

    /// A thread per range, each waiting for it.
    fn spawn_waiters<const N: usize>(
        a: &Arc<Arrivals>,
        ranges: [Range<u64>; N],
    ) -> Vec<std::thread::JoinHandle<Result<(), ObjectError>>> {
        ranges
            .into_iter()
            .map(|r| {
                let a = a.clone();
                std::thread::spawn(move || a.wait_for(r))
            })
            .collect()
    }

    #[test]
    fn waiters_wake_when_their_range_arrives() {
        let a = Arc::new(Arrivals::new(30));
        let waiters = spawn_waiters(&a, [0..10, 10..20, 5..25]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(waiters.iter().all(|w| !w.is_finished()), "nothing arrived, nobody returns");
        a.arrived(10..20);
        a.arrived(20..30);
        // Woken, not slept past: a loaded machine may take a while to run the woken thread.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !waiters[1].is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(waiters[1].is_finished() && !waiters[0].is_finished() && !waiters[2].is_finished());
        a.arrived(0..10);
        for w in waiters {
            w.join().unwrap().unwrap();
        }
    }

    #[test]
    fn a_failed_fetch_wakes_every_waiter_with_its_error() {
        let a = Arc::new(Arrivals::new(30));
        a.arrived(0..10);
        let waiters = spawn_waiters(&a, [10..20, 0..30]);
        std::thread::sleep(Duration::from_millis(50));
        let gone = ObjectError::Changed { etag: "e1".into() };
        a.finish(Err(gone.clone()));
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err(gone.clone()));
        }
        // What arrived before the failure is the object's (pinned to its etag): still served.
        a.wait_for(0..10).unwrap();
        // The first outcome stays.
        a.finish(Ok(()));
        assert_eq!(a.wait_all(), Err(gone));
    }

    #[test]
    fn a_fetch_that_stops_without_finishing_fails_its_waiters() {
        let a = Arc::new(Arrivals::new(10));
        let w = {
            let a = a.clone();
            std::thread::spawn(move || a.wait_all())
        };
        let a2 = a.clone();
        let _ = std::thread::spawn(move || {
            let _guard = FinishGuard(&a2);
            panic!("the fetch panics");
        })
        .join();
        assert!(matches!(w.join().unwrap(), Err(ObjectError::Unavailable(_))));
    }

    #[test]
    fn an_incoming_copy_reads_what_arrived() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 20]).unwrap();
        let inc = Arc::new(Incoming::new(20));
        let reader = {
            let inc = inc.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 5];
                inc.read_exact_at(&mut buf, 12).map(|()| buf)
            })
        };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        inc.set_file(file.try_clone().unwrap());
        file.write_all_at(&[7u8; 10], 10).unwrap();
        inc.arrivals.arrived(10..20);
        assert_eq!(reader.join().unwrap().unwrap(), [7u8; 5]);
        inc.arrivals.finish(Ok(()));
        assert!(inc.whole_file().is_ok());
    }
}
