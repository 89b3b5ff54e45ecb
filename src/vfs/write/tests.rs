use std::os::unix::fs::FileExt;

use super::*;

#[test]
fn paths_that_leave_the_entry_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let staging = Staging::default();
    for bad in ["../x", "a/../b", "/abs", "a//b", "a/", ".", ""] {
        let e = staging.open(&store, "base", "new", bad, true, false).err().map(|e| e.errno);
        assert_eq!(e, Some(libc::EINVAL), "open of {bad:?}");
        let e = staging.mkdir_sub(&store, "base", "new", bad).err().map(|e| e.errno);
        assert_eq!(e, Some(libc::EINVAL), "mkdir of {bad:?}");
        let e = staging.rename(&store, "base", "new", "a", bad).err().map(|e| e.errno);
        assert_eq!(e, Some(libc::EINVAL), "rename to {bad:?}");
    }
    assert!(store.load().unwrap().entries.is_empty());
}

/// Two opens of one stored file without O_TRUNC: the second waits until the first's copy
/// of the stored bytes is in, so that copy cannot overwrite the second's writes.
#[test]
fn a_second_open_waits_for_the_copy_in_of_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    crate::demo::write_model(&model, &crate::demo::ModelSpec::tiny()).unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    crate::registry::add::add(&store, "base", &model, &Default::default()).unwrap();
    let staging = Arc::new(Staging::default());
    let (first, id, existed) = staging.open(&store, "base", "new", "a.txt", false, true).unwrap();
    assert!(!existed);
    let (tx, rx) = std::sync::mpsc::channel();
    let second = {
        let (staging, store) = (staging.clone(), store.clone());
        std::thread::spawn(move || {
            let (f, _, existed) = staging.open(&store, "base", "new", "a.txt", false, true).unwrap();
            assert!(existed);
            // Its early write, which the first open's copy must not overwrite.
            f.write_all_at(b"B", 0).unwrap();
            tx.send(()).unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "the second open returned while the first was copying");
    first.write_all_at(b"stored", 0).unwrap();
    staging.filled("base", "new", id, Ok(()));
    rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the second open never returned");
    second.join().unwrap();
    let path = staging.staged_path("base", "new", "a.txt").unwrap();
    assert_eq!(fs::read(path).unwrap(), b"Btored");

    // A failed copy fails the opens that waited for it, and the file is never stored.
    let (_f, id, _) = staging.open(&store, "base", "new", "b.txt", false, true).unwrap();
    let waiter = {
        let (staging, store) = (staging.clone(), store.clone());
        std::thread::spawn(move || staging.open(&store, "base", "new", "b.txt", false, true).map(drop))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    staging.filled("base", "new", id, Err("a read failed".into()));
    let e = waiter.join().unwrap().unwrap_err();
    assert!(e.errno == libc::EIO && e.message.unwrap().contains("a read failed"));
    let e = staging.commit(&store, "base", "new", id).unwrap_err();
    assert!(e.message.unwrap().contains("not stored"));
}

#[test]
fn paths_move_with_their_directory() {
    assert!(within("a/b", "a") && within("a", "a") && !within("ab", "a") && !within("a", "a/b"));
    assert_eq!(moved("a/b/c", "a/b", "z"), "z/c");
    assert_eq!(join("", "x"), "x");
    assert_eq!(join("d", "x"), "d/x");
}
