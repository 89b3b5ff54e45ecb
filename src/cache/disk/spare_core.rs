//! Waiting for a spare core before work that can wait: a commit's read-back hash.
//!
//! Why: the commit of a fill reads its file back and hashes it right when the loader reads
//! what was just filled. Its thread runs at nice 19, but nice orders threads within their
//! scheduling group only, and with autogroup scheduling (the default on desktop and server
//! kernels) the daemon, a session of its own, and the loader's session share the cores
//! evenly: on 2 cores the commits of a 1 GB cast took half the CPU while `load_file` read its
//! last shard (`perf` of a first load: the loader's copy of shard 2 took 0.24 s instead of
//! about 0.1). `SCHED_IDLE` is weighed within the group too. Idle time does not tell either:
//! the loader, given half the cores, leaves none idle and looks content.
//!
//! So before each piece of such work the thread counts the machine's runnable threads (the
//! kernel's `nr_running`, the fourth field of `/proc/loadavg`): while the others would fill
//! every online core, it sleeps a little instead. It goes on at once when hurried (an unmount,
//! or a fill waiting for room, waits for commits), and after [`MAX_WAIT`] in all, so a machine
//! that is never idle still gets its commits.

use std::time::Duration;

/// How long to sleep before counting again.
const NAP: Duration = Duration::from_millis(5);

/// The most one piece of work waits in all, however busy the machine.
const MAX_WAIT: Duration = Duration::from_secs(3);

/// Tracks the wait of one thread of deferrable work (see the module docs).
pub(super) struct SpareCore {
    cores: usize,
    waited: Duration,
}

impl SpareCore {
    pub fn new() -> SpareCore {
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        SpareCore { cores: usize::try_from(online).unwrap_or(1).max(1), waited: Duration::ZERO }
    }

    /// Return when the machine's other runnable threads leave a core for this one, when
    /// `hurry()` says so, or once this tracker has waited [`MAX_WAIT`] in all.
    pub fn wait(&mut self, hurry: impl Fn() -> bool) {
        while self.waited < MAX_WAIT && !hurry() {
            // nr_running counts this thread too.
            match runnable() {
                Some(n) if n.saturating_sub(1) >= self.cores => {}
                _ => return,
            }
            std::thread::sleep(NAP);
            self.waited += NAP;
        }
    }
}

/// The machine's runnable threads now (`/proc/loadavg`'s "R/T" field), None where unreadable
/// (then nothing waits).
fn runnable() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_hurried_wait_returns_at_once() {
        assert!(runnable().is_some_and(|n| n >= 1), "/proc/loadavg counts no runnable thread");
        let start = Instant::now();
        SpareCore::new().wait(|| true);
        assert!(start.elapsed() < NAP, "a hurried wait slept");
    }

    #[test]
    fn a_busy_machine_waits_at_most_max_wait() {
        // A runnable thread more than the machine has cores: none is spare, whatever else runs.
        let spare = SpareCore::new();
        let stop = Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..spare.cores + 1)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let mut spare = spare;
        let start = Instant::now();
        spare.wait(|| false);
        let waited = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        spinners.into_iter().for_each(|s| s.join().unwrap());
        assert!(waited >= MAX_WAIT / 2, "waited only {waited:?} with every core busy");
        assert!(waited < MAX_WAIT + Duration::from_secs(3), "waited {waited:?}, past its bound");
    }
}
