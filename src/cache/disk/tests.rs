//! Tests of the disk cache on real directories: fills and reopening, the capacity, changed,
//! truncated and damaged entries, concurrent callers, crash leftovers, and the fill's leaves.

use std::sync::atomic::{AtomicU64, Ordering};

use super::eviction::BLOCK;
use super::*;

fn key(n: u8) -> Key {
    KeyBuilder::new("test").part(&[n]).finish()
}

fn fill_with(byte: u8) -> impl FnOnce(&File) -> Result<Vec<Leaf>, String> {
    move |f: &File| {
        let len = f.metadata().unwrap().len() as usize;
        f.write_all_at(&vec![byte; len], 0).map_err(|e| e.to_string())?;
        Ok(vec![])
    }
}

fn read_all(c: &Cached) -> Vec<u8> {
    let mut v = vec![0; c.len as usize];
    c.file.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn fills_once_commits_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
    let c = cache.get_or_fill(&key(1), 10_000, "one", fill_with(7)).unwrap().unwrap();
    assert_eq!(read_all(&c), vec![7; 10_000]);
    cache.flush();
    let again = cache.get_or_fill(&key(1), 10_000, "one", |_| panic!("filled twice")).unwrap().unwrap();
    assert_eq!(read_all(&again), vec![7; 10_000]);
    assert_eq!(cache.stats().fills, 1);
    drop(cache);
    let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
    let c = cache.get_or_fill(&key(1), 10_000, "one", |_| panic!("not kept")).unwrap().unwrap();
    assert_eq!(read_all(&c), vec![7; 10_000]);
}

#[test]
fn stays_within_capacity_evicting_least_recent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(DiskCache::open(dir.path(), 5 * (8192 + BLOCK), Verify::Stat).unwrap());
    for n in 0..10 {
        cache.get_or_fill(&key(n), 8192, "k", fill_with(n)).unwrap().unwrap();
        cache.flush();
        assert!(cache.stats().used_bytes <= cache.capacity());
        let on_disk: u64 =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
        assert!(on_disk <= cache.capacity(), "{on_disk} bytes on disk");
    }
    assert_eq!(cache.stats().entries, 5);
    assert!(cache.get_or_fill(&key(1), 1 << 30, "huge", fill_with(0)).unwrap().is_none());
}

#[test]
fn a_changed_or_truncated_entry_is_filled_again() {
    for (verify, damage) in [(Verify::Full, "flip"), (Verify::Stat, "flip"), (Verify::Stat, "truncate")] {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, verify).unwrap());
            cache.get_or_fill(&key(3), 5000, "x", fill_with(3)).unwrap();
            cache.flush();
        }
        let data = dir.path().join(key(3).hex());
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        match damage {
            "flip" => f.write_all_at(&[4], 4000).unwrap(),
            _ => f.set_len(4000).unwrap(),
        }
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, verify).unwrap());
        let c = cache.get_or_fill(&key(3), 5000, "x", fill_with(3)).unwrap().unwrap();
        assert_eq!(read_all(&c), vec![3; 5000], "{verify:?} {damage}");
        assert_eq!(cache.stats().rejected + cache.stats().fills, 2 - (damage == "truncate") as u64);
    }
}

#[test]
fn content_damaged_below_the_filesystem_is_caught_by_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        cache.get_or_fill(&key(5), 5000, "x", fill_with(5)).unwrap();
        cache.flush();
    }
    // Same length, inode and ctime, other bytes: what only the hash can see.
    let meta_path = dir.path().join(format!("{}.meta", key(5).hex()));
    let mut meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta.hash = "0".repeat(64);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
    cache.get_or_fill(&key(5), 5000, "x", fill_with(5)).unwrap().unwrap();
    assert_eq!((cache.stats().rejected, cache.stats().fills), (1, 1));
}

#[test]
fn concurrent_callers_share_one_fill_and_failures_are_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
    let fills = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (cache, fills) = (cache.clone(), fills.clone());
            std::thread::spawn(move || {
                let c = cache
                    .get_or_fill(&key(9), 3000, "x", |f| {
                        fills.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        fill_with(9)(f)
                    })
                    .unwrap()
                    .unwrap();
                read_all(&c)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), vec![9; 3000]);
    }
    assert_eq!(fills.load(Ordering::SeqCst), 1);
    assert!(cache.get_or_fill(&key(10), 100, "bad", |_| Err("boom".into())).is_err());
    let c = cache.get_or_fill(&key(10), 100, "bad", fill_with(1)).unwrap().unwrap();
    assert_eq!(read_all(&c), vec![1; 100]);
}

#[test]
fn crash_leftovers_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    std::fs::write(dir.path().join("tmp").join("half-written"), b"x").unwrap();
    // Data renamed into place, its sidecar never written.
    std::fs::write(dir.path().join(key(2).hex()), b"uncommitted").unwrap();
    let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
    assert_eq!(cache.stats().entries, 0);
    assert!(!dir.path().join(key(2).hex()).exists());
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    match DiskCache::open(dir.path(), 1 << 20, Verify::Full) {
        Err(DiskCacheError::Locked { holder, .. }) => assert_eq!(holder, ""),
        _ => panic!("a second open of a held directory"),
    }
    cache.set_holder("the test");
    match DiskCache::open(dir.path(), 1 << 20, Verify::Full) {
        Err(e @ DiskCacheError::Locked { .. }) => {
            assert!(e.to_string().ends_with("in use by the test"), "{e}")
        }
        _ => panic!("a second open of a held directory"),
    }
    drop(cache);
    let cache = DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap();
    assert_eq!(std::fs::read(dir.path().join("lock")).unwrap(), b"", "{:?}", cache.dir());
}

/// A fill that hashes its own pieces (some of them, out of order, with gaps between them)
/// commits the same hash the file's bytes give with those leaves: a full check passes after
/// a restart, and catches a byte changed below the filesystem in a gap or in a piece. Leaves
/// that overlap are not trusted: the commit hashes the file itself.
#[test]
fn leaves_from_the_fill_commit_a_hash_the_check_agrees_with() {
    let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let leaves_of = |ranges: &[(usize, usize)]| -> Vec<Leaf> {
        ranges.iter().map(|&(a, b)| Leaf::of(a as u64, &content[a..b])).collect()
    };
    let cases: [(&[(usize, usize)], bool); 2] =
        [(&[(50_000, 100_000), (0, 10), (20, 50_000)], true), (&[(0, 60_000), (50_000, 100_000)], false)];
    for (n, (ranges, trusted)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
            let c = cache
                .get_or_fill(&key(n as u8), content.len() as u64, "x", |f| {
                    f.write_all_at(&content, 0).map_err(|e| e.to_string())?;
                    Ok(leaves_of(ranges))
                })
                .unwrap()
                .unwrap();
            assert_eq!(read_all(&c), content);
            cache.flush();
        }
        let meta_path = dir.path().join(format!("{}.meta", key(n as u8).hex()));
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
        assert_eq!(!meta.leaves.is_empty(), trusted, "case {n}: {:?}", meta.leaves);
        if trusted {
            // The given leaves and the gaps before them (10..20 is one).
            assert_eq!(meta.leaves, vec![10, 20, 50_000, 100_000]);
        }
        let reopen = || Arc::new(DiskCache::open(dir.path(), 1 << 20, Verify::Full).unwrap());
        let cache = reopen();
        let c = cache.get_or_fill(&key(n as u8), content.len() as u64, "x", |_| panic!("not kept")).unwrap();
        assert_eq!(read_all(&c.unwrap()), content);
        drop(cache);
        // A byte changed in a gap, then in a leaf, with the inode and ctime kept: only the
        // hash sees it (filled again the same way after each).
        for at in [15u64, 70_000] {
            let meta_before = std::fs::read(&meta_path).unwrap();
            let data = dir.path().join(key(n as u8).hex());
            let st = std::fs::metadata(&data).unwrap();
            let mut m: Meta = serde_json::from_slice(&meta_before).unwrap();
            let f = OpenOptions::new().write(true).open(&data).unwrap();
            f.write_all_at(&[content[at as usize] ^ 1], at).unwrap();
            drop(f);
            m.ctime_ns = ctime_ns(&std::fs::metadata(&data).unwrap());
            assert_eq!(m.ino, st.ino());
            std::fs::write(&meta_path, serde_json::to_vec(&m).unwrap()).unwrap();
            let cache = reopen();
            let c = cache.get_or_fill(&key(n as u8), content.len() as u64, "x", |f| {
                f.write_all_at(&content, 0).map_err(|e| e.to_string())?;
                Ok(leaves_of(ranges))
            });
            assert_eq!(read_all(&c.unwrap().unwrap()), content);
            assert_eq!((cache.stats().rejected, cache.stats().fills), (1, 1), "case {n}, byte {at}");
            cache.flush();
        }
    }
}

/// A fill written in unaligned pieces is re-folded at its commit (each whole 2 MiB span read,
/// dropped and written back): the committed entry has the same bytes, passes the full check
/// after a reopen, and a reader holding the fill's file meanwhile reads the same bytes.
#[test]
fn a_refolded_fill_keeps_its_bytes_and_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let len = 5 * (2 << 20) + 12345;
    let want: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
    let cache = Arc::new(DiskCache::open(dir.path(), 64 << 20, Verify::Full).unwrap());
    let bytes = want.clone();
    let c = cache
        .get_or_fill_written(&key(9), len as u64, "pieces", "decoded", |f| {
            // Pieces of 2 MiB from an unaligned start, as a fill by pwrite writes them.
            f.write_all_at(&bytes[..777], 0).map_err(|e| e.to_string())?;
            for (i, piece) in bytes[777..].chunks(2 << 20).enumerate() {
                f.write_all_at(piece, 777 + (i as u64) * (2 << 20)).map_err(|e| e.to_string())?;
            }
            Ok(Written { leaves: vec![], refold: true })
        })
        .unwrap()
        .unwrap();
    cache.flush();
    assert!(read_all(&c) == want, "the fill's reader after the re-fold");
    drop(cache);
    let cache = Arc::new(DiskCache::open(dir.path(), 64 << 20, Verify::Full).unwrap());
    let again =
        cache.get_or_fill(&key(9), len as u64, "pieces", |_| panic!("filled twice")).unwrap().unwrap();
    assert!(read_all(&again) == want, "the committed entry");
}
