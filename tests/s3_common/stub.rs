//! A tiny S3-ish HTTP/1.1 server on 127.0.0.1 that misbehaves on purpose: one that ignores
//! If-None-Match / If-Match (as some S3-compatible servers do), one that throttles (503
//! SlowDown), one that stalls mid-body. Enough of S3 for PUT, GET, HEAD and DELETE of whole
//! objects; every response closes the connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Stores objects but ignores every precondition header.
    IgnoresConditions,
    /// Answers the first `n` requests with 503 SlowDown, then as `IgnoresConditions`.
    Throttle(usize),
    /// GET sends the headers and a few bytes of the body, then nothing until dropped.
    Stall,
}

struct Shared {
    mode: Mode,
    hits: AtomicUsize,
    stop: AtomicBool,
    objects: Mutex<HashMap<String, (Vec<u8>, u64)>>,
    next_etag: AtomicUsize,
}

pub struct Stub {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Stub {
    /// With `objects` already stored (keys are URL paths: `/BUCKET/KEY`).
    pub fn start(mode: Mode, objects: &[(&str, &[u8])]) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode,
            hits: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            objects: Mutex::new(objects.iter().map(|(k, v)| (k.to_string(), (v.to_vec(), 1))).collect()),
            next_etag: AtomicUsize::new(2),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let _ = serve(&s, conn);
                    });
                }
            }
        });
        Stub { port, shared, accept: Some(accept) }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

fn serve(s: &Shared, mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let path = path.split('?').next().unwrap_or("").to_string();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let hit = s.hits.fetch_add(1, Ordering::SeqCst);

    if let Mode::Throttle(n) = s.mode {
        if hit < n {
            let xml = b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            return respond(&mut conn, "503 Slow Down", &[("Content-Type", "application/xml".into())], xml);
        }
    }
    let meta = |etag: u64| {
        vec![
            ("ETag", format!("\"{etag}\"")),
            ("Last-Modified", "Tue, 01 Dec 2026 08:00:00 GMT".to_string()),
            ("Content-Type", "application/octet-stream".to_string()),
        ]
    };
    let not_found = |conn: &mut TcpStream| {
        let xml = b"<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>no</Message></Error>";
        respond(conn, "404 Not Found", &[("Content-Type", "application/xml".into())], xml)
    };
    let found = s.objects.lock().unwrap().get(&path).cloned();
    match (method.as_str(), found) {
        ("PUT", _) => {
            let etag = s.next_etag.fetch_add(1, Ordering::SeqCst) as u64;
            s.objects.lock().unwrap().insert(path, (body, etag));
            respond(&mut conn, "200 OK", &meta(etag), b"")
        }
        ("GET", Some((data, etag))) if matches!(s.mode, Mode::Stall) => {
            let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", data.len());
            for (k, v) in meta(etag) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            conn.write_all(head.as_bytes())?;
            conn.write_all(&data[..data.len().min(10)])?;
            conn.flush()?;
            while !s.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        }
        ("GET", Some((data, etag))) => respond(&mut conn, "200 OK", &meta(etag), &data),
        ("HEAD", Some((data, etag))) => {
            let mut head =
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n", data.len());
            for (k, v) in meta(etag) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            conn.write_all(head.as_bytes())
        }
        ("DELETE", _) => {
            s.objects.lock().unwrap().remove(&path);
            respond(&mut conn, "204 No Content", &[], b"")
        }
        _ => not_found(&mut conn),
    }
}
