//! The S3 backend: `object_store`'s `AmazonS3` driven from sync code on one private tokio
//! runtime, with the timeouts and retry bound that make every call return (see the module doc
//! of `store`). `object_store` (Apache Arrow's) is used because it is the maintained, widely
//! deployed Rust client that already does SigV4, the AWS credential chain, If-Match /
//! If-None-Match puts, multipart uploads, retry with jittered backoff on 5xx / 429 / SlowDown /
//! transport errors, and the re-fetch of a GET body broken mid-stream at the same etag.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path as FsPath;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::reader::{split_parts, ReadOptions};
use super::{Cond, Object, ObjectMeta, StoreError};

/// Objects up to this size are uploaded with one PUT; larger ones multipart.
const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Multipart part size: S3 wants ≥ 5 MiB parts (but the last) and ≤ 10 000 parts, so parts grow
/// past 16 MiB only for objects over 156 GiB.
const MIN_PART: u64 = 16 << 20;
const MAX_PARTS: u64 = 10_000;
/// Parts uploaded at once: 4 × 16 MiB in memory, enough to fill a link on 2 cores.
const UPLOAD_IN_FLIGHT: usize = 4;

/// How long one request may take and how long failures are retried. Every operation returns
/// (with the answer or an error) within [`Limits::bound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Establishing a connection.
    pub connect: Duration,
    /// One whole request, body included (a 16 MiB part at 0.6 MB/s still fits in 30 s).
    pub request: Duration,
    /// Retries (with jittered exponential backoff from 100 ms, doubling) stop once this much
    /// time has passed since the first attempt…
    pub retry_total: Duration,
    /// …or after this many retries.
    pub max_retries: usize,
    /// The longest single backoff sleep.
    pub max_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            retry_total: Duration::from_secs(30),
            max_retries: 10,
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// The defaults, with `LLMFS_S3_CONNECT_SECS`, `LLMFS_S3_REQUEST_SECS` and
    /// `LLMFS_S3_RETRY_SECS` (whole seconds) in place of `connect`, `request` and `retry_total`
    /// where set: how long a reader waits on a dead server before EIO.
    pub fn from_env() -> Limits {
        let secs = |name: &str, default: Duration| {
            std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).map_or(default, Duration::from_secs)
        };
        let d = Limits::default();
        Limits {
            connect: secs("LLMFS_S3_CONNECT_SECS", d.connect),
            request: secs("LLMFS_S3_REQUEST_SECS", d.request),
            retry_total: secs("LLMFS_S3_RETRY_SECS", d.retry_total),
            ..d
        }
    }

    /// The hard deadline of one operation: the last retry starts at most `retry_total +
    /// max_backoff` after the first attempt and takes at most `request`; 5 s more of margin.
    /// 70 s with the defaults. Past it the operation fails with [`StoreError::Timeout`].
    pub fn bound(&self) -> Duration {
        self.retry_total + self.max_backoff + self.request + Duration::from_secs(5)
    }
}

/// Where an S3 store is and how to reach it. Built by [`S3Config::from_env`] for
/// `s3://BUCKET[/PREFIX]`, or field by field (tests).
#[derive(Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` ("" for none).
    pub prefix: String,
    /// `AWS_REGION` (default `us-east-1`).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL`, for S3-compatible servers (path-style requests).
    pub endpoint: Option<String>,
    /// `AWS_ALLOW_HTTP=true`: permit a plain-http endpoint.
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Also take every other `AWS_*` setting `object_store` knows (web identity, ECS container
    /// credentials, …) from the environment.
    pub inherit_env: bool,
    pub limits: Limits,
}

impl fmt::Debug for S3Config {
    // Credentials are shown as set or not, never their value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("session_token", &set(&self.session_token))
            .field("limits", &self.limits)
            .finish()
    }
}

impl S3Config {
    /// Bucket and prefix of `s3://BUCKET[/PREFIX]`.
    pub fn parse_url(url: &str) -> Result<(String, String), StoreError> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| StoreError::Config(format!("{url}: not an s3://BUCKET[/PREFIX] address")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config(format!("{url}: no bucket name")));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            super::check_key(&prefix).map_err(|e| StoreError::Config(format!("{url}: prefix: {e}")))?;
        }
        Ok((bucket.to_string(), prefix))
    }

    /// `url` plus the standard AWS environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` (or
    /// `AWS_ENDPOINT_URL_S3`), `AWS_ALLOW_HTTP`.
    pub fn from_env(url: &str) -> Result<S3Config, StoreError> {
        let (bucket, prefix) = S3Config::parse_url(url)?;
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(S3Config {
            bucket,
            prefix,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint: var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL")),
            allow_http: var("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            inherit_env: true,
            limits: Limits::from_env(),
        })
    }
}

/// The module's runtime, started on first use: a few worker threads are plenty, the work is
/// waiting on sockets (plus TLS and checksums).
fn runtime() -> Result<&'static Runtime, StoreError> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("llmfs-store")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Config(format!("cannot start the store's I/O threads: {e}")))?;
    // A racing thread may have set it first; ours is then dropped (outside any runtime: fine).
    Ok(RUNTIME.get_or_init(|| rt))
}

/// A spawned request that is cancelled when dropped (a reader that seeks away, a failed
/// parallel read), so nothing keeps downloading for nobody.
pub(super) struct Task<T>(JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Task<Result<T, StoreError>> {
    type Output = Result<T, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            joined.unwrap_or_else(|e| {
                Err(StoreError::Io { key: String::new(), reason: format!("I/O task: {e}") })
            })
        })
    }
}

/// Runs `fut` under the hard deadline.
async fn deadline<T>(
    bound: Duration,
    key: &str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(bound, fut)
        .await
        .unwrap_or_else(|_| Err(StoreError::Timeout { key: key.into(), secs: bound.as_secs() }))
}

fn map_err(key: &str, e: object_store::Error) -> StoreError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => StoreError::NotFound { key: key.into() },
        E::AlreadyExists { .. } => StoreError::AlreadyExists { key: key.into() },
        E::Precondition { .. } => StoreError::Precondition { key: key.into() },
        // object_store's messages name the URL and the cause, never the credentials.
        e => StoreError::Io { key: key.into(), reason: e.to_string() },
    }
}

fn meta_of(key: &str, m: object_store::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        key: key.into(),
        size: m.size,
        etag: m.e_tag.unwrap_or_default(),
        last_modified: SystemTime::from(m.last_modified),
    }
}

/// One ranged GET (If-Match `etag` when given), checked to be exactly the bytes asked for: S3
/// clips a range past the end instead of failing, and that must not pass for the data.
async fn fetch_range(
    store: &AmazonS3,
    path: &Path,
    key: &str,
    range: Range<u64>,
    etag: Option<String>,
) -> Result<Bytes, StoreError> {
    let opts =
        GetOptions { range: Some(GetRange::Bounded(range.clone())), if_match: etag, ..Default::default() };
    let got = store.get_opts(path, opts).await.map_err(|e| map_err(key, e))?;
    if got.range != range {
        return Err(StoreError::Range {
            key: key.into(),
            start: range.start,
            end: range.end,
            size: got.meta.size,
        });
    }
    let bytes = got.bytes().await.map_err(|e| map_err(key, e))?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(StoreError::Io {
            key: key.into(),
            reason: format!("short read: {} bytes for {range:?}", bytes.len()),
        });
    }
    Ok(bytes)
}

pub(super) struct S3Store {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    limits: Limits,
    rt: &'static Runtime,
}

impl S3Store {
    pub(super) fn new(config: S3Config) -> Result<S3Store, StoreError> {
        if let Some(endpoint) = &config.endpoint {
            if endpoint.starts_with("http://") && !config.allow_http {
                return Err(StoreError::Config(format!(
                    "{endpoint} is plain http; set AWS_ALLOW_HTTP=true to allow it"
                )));
            }
        }
        let l = config.limits;
        let mut b = if config.inherit_env { AmazonS3Builder::from_env() } else { AmazonS3Builder::new() };
        b = b
            .with_bucket_name(&config.bucket)
            .with_region(config.region.as_deref().unwrap_or("us-east-1"))
            .with_allow_http(config.allow_http)
            // Whatever AWS_* variables `from_env` found: certificates are verified, and puts
            // use If-Match / If-None-Match (the probe then says whether the server honours them).
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::AllowInvalidCertificates), "false")
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", l.connect.as_millis()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", l.request.as_millis()),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: l.max_backoff,
                    base: 2.0,
                },
                max_retries: l.max_retries,
                retry_timeout: l.retry_total,
            });
        if let Some(endpoint) = &config.endpoint {
            b = b.with_endpoint(endpoint);
        }
        if let Some(v) = &config.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &config.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = &config.session_token {
            b = b.with_token(v);
        }
        // Not `{e:?}` of the builder anywhere: its derived Debug would print the secret key.
        let store = b.build().map_err(|e| StoreError::Config(format!("s3://{}: {e}", config.bucket)))?;
        Ok(S3Store {
            store: Arc::new(store),
            bucket: config.bucket,
            prefix: config.prefix,
            limits: l,
            rt: runtime()?,
        })
    }

    pub(super) fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn path(&self, key: &str) -> Result<Path, StoreError> {
        let full = if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) };
        Path::parse(&full)
            .map_err(|_| StoreError::InvalidKey { key: key.into(), reason: "not a valid object path" })
    }

    /// Runs `fut` on the runtime under the hard deadline, blocking the calling thread.
    fn block<T>(&self, key: &str, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        self.rt.block_on(deadline(self.limits.bound(), key, fut))
    }

    pub(super) fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Bytes, StoreError> {
        if range.is_empty() {
            // S3 cannot express an empty range; the object must still exist (at that etag).
            let meta = self.head(key)?;
            if etag.is_some_and(|e| e != meta.etag) {
                return Err(StoreError::Precondition { key: key.into() });
            }
            return Ok(Bytes::new());
        }
        let path = self.path(key)?;
        self.block(key, fetch_range(&self.store, &path, key, range, etag.map(str::to_string)))
    }

    /// Starts fetching `range` now; the bytes come from awaiting (or [`S3Store::wait`]ing) it.
    pub(super) fn spawn_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> Result<Task<Result<Bytes, StoreError>>, StoreError> {
        let path = self.path(key)?;
        let (store, key, bound, etag) =
            (self.store.clone(), key.to_string(), self.limits.bound(), etag.map(str::to_string));
        Ok(Task(self.rt.spawn(async move {
            deadline(bound, &key, fetch_range(&store, &path, &key, range, etag)).await
        })))
    }

    pub(super) fn wait<T>(&self, task: Task<Result<T, StoreError>>) -> Result<T, StoreError> {
        self.rt.block_on(task)
    }

    pub(super) fn get(&self, key: &str) -> Result<Object, StoreError> {
        let path = self.path(key)?;
        self.block(key, async {
            let got = self.store.get(&path).await.map_err(|e| map_err(key, e))?;
            let etag = got.meta.e_tag.clone().unwrap_or_default();
            let bytes = got.bytes().await.map_err(|e| map_err(key, e))?;
            Ok(Object { bytes, etag })
        })
    }

    pub(super) fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let path = self.path(key)?;
        self.block(key, async {
            self.store.head(&path).await.map(|m| meta_of(key, m)).map_err(|e| map_err(key, e))
        })
    }

    pub(super) fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full = match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (true, false) => Some(prefix.to_string()),
            (false, true) => Some(self.prefix.clone()),
            (false, false) => Some(format!("{}/{prefix}", self.prefix)),
        };
        let full = full
            .map(|p| Path::parse(&p))
            .transpose()
            .map_err(|_| StoreError::InvalidKey { key: prefix.into(), reason: "not a valid object path" })?;
        let strip = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        self.block(prefix, async {
            let metas: Vec<object_store::ObjectMeta> =
                self.store.list(full.as_ref()).try_collect().await.map_err(|e| map_err(prefix, e))?;
            Ok(metas
                .into_iter()
                .filter_map(|m| {
                    let key = m.location.as_ref().get(strip..)?.to_string();
                    Some(meta_of(&key, m))
                })
                .collect())
        })
    }

    pub(super) fn put(&self, key: &str, bytes: Bytes, cond: Cond) -> Result<String, StoreError> {
        let path = self.path(key)?;
        let mode = match cond {
            Cond::None => PutMode::Overwrite,
            Cond::Absent => PutMode::Create,
            Cond::Match(etag) => {
                PutMode::Update(UpdateVersion { e_tag: Some(etag.to_string()), version: None })
            }
        };
        self.block(key, async {
            match self.store.put_opts(&path, PutPayload::from(bytes), PutOptions::from(mode)).await {
                Ok(r) => Ok(r.e_tag.unwrap_or_default()),
                Err(object_store::Error::NotImplemented { operation, .. }) => {
                    Err(StoreError::NoConditionalWrites {
                        location: self.location(),
                        detail: format!("the client was configured without them: {operation}"),
                    })
                }
                Err(e) => Err(map_err(key, e)),
            }
        })
    }

    pub(super) fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.block(key, async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(map_err(key, e)),
            }
        })
    }

    /// One PUT for small files; multipart otherwise, parts read from disk on the calling
    /// thread and uploaded `UPLOAD_IN_FLIGHT` at a time. A failed upload is aborted (S3 then
    /// drops its parts); nothing is visible under `key` until `complete` succeeds.
    pub(super) fn put_file(
        &self,
        key: &str,
        src: &FsPath,
        progress: &mut dyn FnMut(u64),
    ) -> Result<String, StoreError> {
        let src_key = src.display().to_string();
        let io = |e: std::io::Error| StoreError::Io { key: src_key.clone(), reason: e.to_string() };
        let file = File::open(src).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let read_part = |range: &Range<u64>| -> Result<Vec<u8>, StoreError> {
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start).map_err(io)?;
            Ok(buf)
        };
        if size <= SINGLE_PUT_MAX {
            let etag = self.put(key, read_part(&(0..size))?.into(), Cond::None)?;
            progress(size);
            return Ok(etag);
        }
        let path = self.path(key)?;
        let part_size = MIN_PART.max(size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
        let mut upload =
            self.block(key, async { self.store.put_multipart(&path).await.map_err(|e| map_err(key, e)) })?;
        let bound = self.limits.bound();
        let uploaded = (|| -> Result<String, StoreError> {
            let mut in_flight: VecDeque<(u64, Task<Result<(), StoreError>>)> = VecDeque::new();
            let mut done = 0u64;
            for range in split_parts(0..size, part_size) {
                let part = upload.put_part(PutPayload::from(read_part(&range)?));
                let part_key = key.to_string();
                let task = Task(self.rt.spawn(async move {
                    deadline(bound, &part_key, async { part.await.map_err(|e| map_err(&part_key, e)) }).await
                }));
                in_flight.push_back((range.end - range.start, task));
                if in_flight.len() >= UPLOAD_IN_FLIGHT {
                    let (len, task) = in_flight.pop_front().expect("non-empty");
                    self.wait(task)?;
                    done += len;
                    progress(done);
                }
            }
            for (len, task) in in_flight {
                self.wait(task)?;
                done += len;
                progress(done);
            }
            let r = self.block(key, async { upload.complete().await.map_err(|e| map_err(key, e)) })?;
            Ok(r.e_tag.unwrap_or_default())
        })();
        if uploaded.is_err() {
            // Best effort, in the background so that the error is not delayed by a second
            // retry period against a server that is down: a left-over upload costs storage
            // until the bucket's lifecycle rule (or `gc`) removes it, but is never an object.
            drop(self.rt.spawn(async move {
                let _ = tokio::time::timeout(bound, upload.abort()).await;
            }));
        }
        uploaded
    }

    /// Parts fetched concurrently (each a spawned, deadline-bounded GET), delivered in order.
    pub(super) fn read_range_parallel(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        opts: &ReadOptions,
        sink: &mut dyn FnMut(u64, Bytes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let parts = split_parts(range, opts.part_size);
        let spawn = |r: Range<u64>| (r.start, self.spawn_range(key, r, etag));
        // `buffered` keeps `max_in_flight` spawned GETs running and yields them in order; the
        // sink runs here, on the calling thread, while the next parts download.
        self.rt.block_on(async {
            let mut stream = futures::stream::iter(parts.into_iter().map(spawn))
                .map(|(offset, task)| async move { Ok::<_, StoreError>((offset, task?.await?)) })
                .buffered(opts.max_in_flight.max(1));
            while let Some(part) = stream.next().await {
                let (offset, bytes) = part?;
                sink(offset, bytes)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_parse_into_bucket_and_prefix() {
        let p = |u| S3Config::parse_url(u);
        assert_eq!(p("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(p("s3://b/").unwrap(), ("b".into(), "".into()));
        assert_eq!(p("s3://b/x/y/").unwrap(), ("b".into(), "x/y".into()));
        assert!(p("s3:///x").is_err());
        assert!(p("s3://b/x//y").is_err());
        assert!(p("http://b").is_err());
    }

    #[test]
    fn the_bound_covers_the_last_retry() {
        let l = Limits::default();
        assert_eq!(l.bound(), Duration::from_secs(70));
        assert!(l.bound() > l.retry_total + l.max_backoff + l.request);
    }
}
