//! Reading objects fast, as mountpoint-s3 does: an object is fetched in aligned parts of
//! [`ReadOptions::part_size`] (8 MiB: big enough that one GET's latency is amortised, small
//! enough that several fit in flight and a random read does not pull much it will not use),
//! with several GETs in flight at once.
//!
//! [`ObjectReader`] serves `pread`-style reads and prefetches for a sequential reader: the
//! first read fetches only the part it needs; each read that continues where the last one
//! ended doubles the window of parts kept in flight ahead, up to
//! [`ReadOptions::max_in_flight`]; a read elsewhere (a seek) cancels what was in flight and
//! starts again from one part. [`super::Store::read_range_parallel`] is the whole-range form
//! (fill a cache file, decode a whole tensor file): every part is requested up front, up to
//! `max_in_flight` at a time, and delivered in order.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use super::s3::Task;
use super::{Store, StoreError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Bytes per GET; parts start at multiples of it.
    pub part_size: u64,
    /// GETs in flight at most (per reader, or per parallel read).
    pub max_in_flight: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        // 8 × 8 MiB: 64 MiB ahead of a sequential reader, the throughput of one S3 prefix
        // connection pool on a 10–25 Gbit/s node (mountpoint-s3 uses 8 MiB parts too).
        ReadOptions { part_size: 8 << 20, max_in_flight: 8 }
    }
}

/// `range` cut at multiples of `part_size` (the first and last parts may be shorter).
pub(super) fn split_parts(range: Range<u64>, part_size: u64) -> Vec<Range<u64>> {
    let part_size = part_size.max(1);
    let mut parts = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = ((start / part_size + 1) * part_size).min(range.end);
        parts.push(start..end);
        start = end;
    }
    parts
}

/// The local backend's `read_range_parallel`: the page cache is the prefetcher there.
pub(super) fn read_parts_serial(
    range: Range<u64>,
    opts: &ReadOptions,
    sink: &mut dyn FnMut(u64, Bytes) -> Result<(), StoreError>,
    mut get: impl FnMut(Range<u64>) -> Result<Bytes, StoreError>,
) -> Result<(), StoreError> {
    for part in split_parts(range, opts.part_size) {
        let start = part.start;
        sink(start, get(part)?)?;
    }
    Ok(())
}

enum PartData {
    Pending(Task<Result<Bytes, StoreError>>),
    Ready(Bytes),
}

struct Part {
    range: Range<u64>,
    data: PartData,
}

#[derive(Default)]
struct Window {
    /// Parts fetched or in flight, in order and contiguous, ending at `next`.
    parts: VecDeque<Part>,
    next: u64,
    /// How many parts to keep ahead; grows while the reader is sequential.
    width: usize,
    /// Where the last read ended: a read starting here is sequential.
    last_end: u64,
}

/// Reads one object of known size with sequential prefetch. `read_at` may be called from many
/// threads; they take turns (one window per reader, as one FUSE file handle has), so a reader
/// per open file keeps concurrent files independent.
pub struct ObjectReader {
    store: Arc<Store>,
    key: String,
    size: u64,
    /// Every part is read at this etag (If-Match): a rewritten object fails the read with
    /// `Precondition` instead of mixing old and new bytes.
    etag: Option<String>,
    opts: ReadOptions,
    window: Mutex<Window>,
}

impl ObjectReader {
    /// A reader for `key`, its size and etag from a `head`.
    pub fn open(store: Arc<Store>, key: &str, opts: ReadOptions) -> Result<ObjectReader, StoreError> {
        let meta = store.head(key)?;
        Ok(ObjectReader::new(store, key, meta.size, Some(meta.etag), opts))
    }

    /// A reader for `key` of `size` bytes at `etag` (known from the registry: no request).
    pub fn new(
        store: Arc<Store>,
        key: &str,
        size: u64,
        etag: Option<String>,
        opts: ReadOptions,
    ) -> ObjectReader {
        ObjectReader { store, key: key.into(), size, etag, opts, window: Mutex::new(Window::default()) }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Up to `len` bytes at `offset` (fewer only at the end of the object, none past it).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let Some(s3) = self.store.s3_backend() else {
            return self.store.get_range_at(&self.key, offset..end, self.etag.as_deref());
        };
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let in_window = w.parts.front().is_some_and(|p| p.range.start <= offset) && offset < w.next;
        if !in_window {
            // A seek (or the first read): drop what is in flight (Task aborts on drop).
            w.parts.clear();
            w.next = offset / self.opts.part_size.max(1) * self.opts.part_size.max(1);
            w.width = 1;
        } else if offset == w.last_end {
            w.width = (w.width * 2).min(self.opts.max_in_flight.max(1));
        }
        while w.parts.front().is_some_and(|p| p.range.end <= offset) {
            w.parts.pop_front();
        }
        // Schedule what this read needs, then the window ahead of it.
        while w.next < self.size && (w.next < end || w.parts.len() < w.width) {
            let part_size = self.opts.part_size.max(1);
            let range = w.next..((w.next / part_size + 1) * part_size).min(self.size);
            let task = s3.spawn_range(&self.key, range.clone(), self.etag.as_deref())?;
            w.next = range.end;
            w.parts.push_back(Part { range, data: PartData::Pending(task) });
        }
        let result = self.collect(&mut w, s3, offset, end);
        match result {
            Ok(bytes) => {
                w.last_end = end;
                Ok(bytes)
            }
            Err(e) => {
                // Start afresh next time: a later read retries instead of repeating the error.
                *w = Window::default();
                Err(e)
            }
        }
    }

    /// Waits for the parts covering `offset..end` and copies them out (a slice, without a copy,
    /// when one part covers the read).
    fn collect(
        &self,
        w: &mut Window,
        s3: &super::s3::S3Store,
        offset: u64,
        end: u64,
    ) -> Result<Bytes, StoreError> {
        let mut out: Option<BytesMut> = None;
        for part in w.parts.iter_mut() {
            if part.range.start >= end {
                break;
            }
            if part.range.end <= offset {
                continue;
            }
            if let PartData::Pending(_) = part.data {
                let PartData::Pending(task) =
                    std::mem::replace(&mut part.data, PartData::Ready(Bytes::new()))
                else {
                    unreachable!()
                };
                let bytes = s3.wait(task)?;
                if bytes.len() as u64 != part.range.end - part.range.start {
                    return Err(StoreError::Io {
                        key: self.key.clone(),
                        reason: format!("short part: {} bytes for {:?}", bytes.len(), part.range),
                    });
                }
                part.data = PartData::Ready(bytes);
            }
            let PartData::Ready(bytes) = &part.data else { unreachable!() };
            let lo = (offset.max(part.range.start) - part.range.start) as usize;
            let hi = (end.min(part.range.end) - part.range.start) as usize;
            if out.is_none() && part.range.start <= offset && part.range.end >= end {
                return Ok(bytes.slice(lo..hi));
            }
            out.get_or_insert_with(|| BytesMut::with_capacity((end - offset) as usize))
                .extend_from_slice(&bytes[lo..hi]);
        }
        Ok(out.map(BytesMut::freeze).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_aligned_and_cover_the_range() {
        assert_eq!(split_parts(0..10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(split_parts(5..13, 4), vec![5..8, 8..12, 12..13]);
        assert_eq!(split_parts(3..3, 4), Vec::<Range<u64>>::new());
    }

    #[test]
    fn local_reader_and_parallel_read_give_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::local(dir.path()).unwrap());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        store.put("f", data.clone().into()).unwrap();
        let reader =
            ObjectReader::open(store.clone(), "f", ReadOptions { part_size: 4096, max_in_flight: 3 })
                .unwrap();
        assert_eq!(&reader.read_at(10, 20_000).unwrap()[..], &data[10..20_010]);
        assert_eq!(&reader.read_at(99_990, 100).unwrap()[..], &data[99_990..]);
        assert!(reader.read_at(100_000, 10).unwrap().is_empty());
        let mut got = Vec::new();
        store
            .read_range_parallel(
                "f",
                7..99_000,
                &ReadOptions { part_size: 4096, max_in_flight: 3 },
                &mut |off, b| {
                    assert_eq!(off, 7 + got.len() as u64);
                    got.extend_from_slice(&b);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(got, &data[7..99_000]);
    }
}
