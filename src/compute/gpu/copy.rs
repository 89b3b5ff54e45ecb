//! Host copies into and out of mapped staging memory, split across a few threads.
//!
//! One thread copies out of host-visible (pinned, driver-mapped) memory at a fraction of what
//! the PCIe link and the memory controllers allow, so the copies of a chunk are cut into equal
//! parts run at once. The threads are a pool of the context's own, fed jobs that the caller
//! waits for on a plain channel: a caller that is itself a rayon worker (the read path's
//! prefetch) must not wait inside rayon, which would let it pick up another read that asks for
//! the GPU while this one holds the buffer pool.

use std::sync::mpsc;

/// Below this many bytes one thread does the whole copy (waking others costs more).
const MIN_PARALLEL: usize = 1 << 20;
/// The smallest part handed to a thread.
const MIN_PART: usize = 256 << 10;

pub(crate) struct Copier {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

/// One copy: `dst` gets `src`, or zeros when `src` is None.
pub(crate) struct Job<'a> {
    pub dst: &'a mut [u8],
    pub src: Option<&'a [u8]>,
}

/// A part of a job, as raw pointers so it can travel to a pool thread.
struct Part {
    dst: *mut u8,
    src: *const u8, // null: fill with zeros
    len: usize,
}

// Safety: a Part points into buffers that the caller of `Copier::run` borrows for the whole
// call, and `run` returns only after every part has been done; parts never overlap.
unsafe impl Send for Part {}

impl Part {
    /// Safety: see the `Send` impl.
    unsafe fn apply(&self) {
        unsafe {
            if self.src.is_null() {
                std::ptr::write_bytes(self.dst, 0, self.len);
            } else {
                std::ptr::copy_nonoverlapping(self.src, self.dst, self.len);
            }
        }
    }
}

impl Copier {
    /// `threads` helpers besides the caller (0: the caller copies alone).
    pub fn new(threads: usize) -> Self {
        let pool = (threads > 0)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("llmfs-gpu-copy-{i}"))
                    .build()
                    .ok()
            })
            .flatten();
        let threads = if pool.is_some() { threads } else { 0 };
        Copier { pool, threads }
    }

    /// Threads that copy at once, the caller included.
    pub fn width(&self) -> usize {
        self.threads + 1
    }

    /// Does every job, splitting the bytes evenly across at most `width` threads (all of them
    /// when `width` is None).
    pub fn run(&self, jobs: Vec<Job<'_>>, width: Option<usize>) {
        let total: usize = jobs.iter().map(|j| j.dst.len()).sum();
        let width = width.unwrap_or(self.width()).clamp(1, self.width()).min(total / MIN_PART).max(1);
        let pool = match &self.pool {
            Some(p) if width > 1 && total >= MIN_PARALLEL => p,
            _ => {
                for j in jobs {
                    match j.src {
                        Some(s) => j.dst.copy_from_slice(s),
                        None => j.dst.fill(0),
                    }
                }
                return;
            }
        };
        // Cut the concatenation of the jobs into `width` runs of about `step` bytes.
        let step = total.div_ceil(width);
        let mut runs: Vec<Vec<Part>> = vec![Vec::new()];
        let mut room = step;
        for j in jobs {
            if let Some(s) = j.src {
                assert_eq!(s.len(), j.dst.len(), "copy: lengths");
            }
            let (dst, src, len) =
                (j.dst.as_mut_ptr(), j.src.map_or(std::ptr::null(), |s| s.as_ptr()), j.dst.len());
            let mut at = 0;
            while at < len {
                if room == 0 {
                    runs.push(Vec::new());
                    room = step;
                }
                let n = room.min(len - at);
                // Safety: `at + n <= len`, inside the job's slices.
                let part = unsafe {
                    Part { dst: dst.add(at), src: if src.is_null() { src } else { src.add(at) }, len: n }
                };
                runs.last_mut().unwrap().push(part);
                at += n;
                room -= n;
            }
        }
        let mine = runs.remove(0);
        let (tx, rx) = mpsc::channel::<()>();
        let sent = runs.len();
        for run in runs {
            let tx = tx.clone();
            pool.spawn(move || {
                for p in &run {
                    // Safety: see `Part`.
                    unsafe { p.apply() };
                }
                let _ = tx.send(());
            });
        }
        for p in &mine {
            // Safety: see `Part`.
            unsafe { p.apply() };
        }
        drop(tx);
        // The borrowed buffers must outlive every part: wait for all of them, whatever happens.
        for _ in 0..sent {
            if rx.recv().is_err() {
                // A pool thread died mid-part (cannot happen: the parts do not panic); its
                // memory may still be written, so never hand the buffers back.
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs of odd sizes, copies and zero fills, cut across threads at arbitrary points.
    #[test]
    fn parallel_copy_is_a_copy() {
        let c = Copier::new(3);
        let src: Vec<u8> = (0..(3 << 20) + 12345).map(|i| (i * 7 + 1) as u8).collect();
        let mut dst = vec![0xAAu8; src.len() + 4097];
        let (a, rest) = dst.split_at_mut(1_000_003);
        let (gap, b) = rest.split_at_mut(4097);
        let jobs = vec![
            Job { dst: a, src: Some(&src[..1_000_003]) },
            Job { dst: gap, src: None },
            Job { dst: b, src: Some(&src[1_000_003..]) },
        ];
        c.run(jobs, None);
        assert_eq!(&dst[..1_000_003], &src[..1_000_003]);
        assert!(dst[1_000_003..1_000_003 + 4097].iter().all(|&x| x == 0));
        assert_eq!(&dst[1_000_003 + 4097..], &src[1_000_003..]);
    }
}
