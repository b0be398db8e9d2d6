//! One file, downloaded into `NAME.part` (resumed with a Range request when a
//! part exists), checked against its SHA-256, then renamed into place: a failed
//! or mismatched download never leaves a file that looks complete. Fetches
//! sharing a directory (init containers of several pods on one cache claim)
//! take turns: an exclusive lock on `NAME.lock` is held while one of them
//! downloads, and the others wait for it, then find the finished file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::FetchError;

pub struct Download<'a> {
    pub url: &'a str,
    pub token: Option<&'a str>,
    pub dest: &'a Path,
    pub sha256: Option<&'a str>,
    pub size: Option<u64>,
}

pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

pub async fn run(client: &reqwest::Client, d: Download<'_>) -> Result<(), FetchError> {
    if already_there(&d).await? {
        tracing::info!(file = %d.dest.display(), "already downloaded");
        return Ok(());
    }
    if let Some(dir) = d.dest.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(|e| FetchError::io(dir, e))?;
    }
    let existed = tokio::fs::try_exists(d.dest).await.unwrap_or(false);
    let _turn = DownloadLock::acquire(d.dest).await?;
    // A file that appeared while this fetch waited was moved into place by the
    // one that held the lock, after its checks.
    let appeared = !existed && tokio::fs::try_exists(d.dest).await.unwrap_or(false);
    if appeared || already_there(&d).await? {
        tracing::info!(file = %d.dest.display(), "downloaded by another fetch");
        return Ok(());
    }
    let part = part_path(d.dest);
    let have = tokio::fs::metadata(&part).await.map(|m| m.len()).unwrap_or(0);
    let mut request = client.get(d.url);
    if let Some(token) = d.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await.map_err(|e| FetchError::Http(format!("{}: {e}", d.url)))?;
    let status = response.status();
    let (mut file, start) = match status {
        StatusCode::PARTIAL_CONTENT => {
            tracing::info!(file = %d.dest.display(), bytes = have, "resuming");
            (open(&part, true).await?, have)
        }
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // The part already holds every byte; only the check is left.
            return finish(&part, &d).await;
        }
        s if s.is_success() => (open(&part, false).await?, 0),
        StatusCode::NOT_FOUND => return Err(FetchError::NotFound(format!("{} (404)", d.url))),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            return Err(FetchError::Http(format!(
                "{}: {status}; set HF_TOKEN for private or gated repositories",
                d.url
            )))
        }
        s => return Err(FetchError::Http(format!("{}: {s}", d.url))),
    };
    let total = d.size.or_else(|| response.content_length().map(|l| l + start));
    let mut progress = Progress::new(d.dest, total, start);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| FetchError::Http(format!("{}: download interrupted: {e}", d.url)))?;
        file.write_all(&chunk).await.map_err(|e| FetchError::io(&part, e))?;
        progress.advance(chunk.len() as u64);
    }
    file.flush().await.map_err(|e| FetchError::io(&part, e))?;
    drop(file);
    progress.done();
    finish(&part, &d).await
}

/// An exclusive lock on `<file>.lock`, held until dropped (closing the file
/// releases it, also when the process dies). The lock file itself stays: removing
/// it would let a later fetch lock a new file while a waiter locks the old one.
struct DownloadLock {
    _held: std::fs::File,
}

impl DownloadLock {
    async fn acquire(dest: &Path) -> Result<Self, FetchError> {
        let mut name = dest.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| FetchError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => return Ok(Self { _held: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(file = %dest.display(), "another fetch is downloading this file; waiting for it");
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(FetchError::io(&path, e)),
        }
        tokio::task::spawn_blocking(move || match file.lock() {
            Ok(()) => Ok(Self { _held: file }),
            Err(e) => Err(FetchError::io(&path, e)),
        })
        .await
        .map_err(|e| FetchError::Http(format!("waiting for the download lock failed: {e}")))?
    }
}

async fn open(path: &Path, append: bool) -> Result<tokio::fs::File, FetchError> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .await
        .map_err(|e| FetchError::io(path, e))
}

/// Checks the finished part and moves it into place, or removes it.
async fn finish(part: &Path, d: &Download<'_>) -> Result<(), FetchError> {
    if let Some(size) = d.size {
        let len = tokio::fs::metadata(part).await.map_err(|e| FetchError::io(part, e))?.len();
        if len != size {
            let _ = tokio::fs::remove_file(part).await;
            return Err(FetchError::Http(format!("{}: got {len} bytes, expected {size}", d.url)));
        }
    }
    if let Some(expected) = d.sha256 {
        let actual = sha256_of(part).await?;
        if !actual.eq_ignore_ascii_case(expected) {
            let _ = tokio::fs::remove_file(part).await;
            return Err(FetchError::ChecksumMismatch {
                file: d.dest.display().to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    tokio::fs::rename(part, d.dest).await.map_err(|e| FetchError::io(d.dest, e))
}

async fn already_there(d: &Download<'_>) -> Result<bool, FetchError> {
    let Ok(meta) = tokio::fs::metadata(d.dest).await else { return Ok(false) };
    if d.size.is_some_and(|s| s != meta.len()) {
        return Ok(false);
    }
    match d.sha256 {
        Some(expected) => Ok(sha256_of(d.dest).await?.eq_ignore_ascii_case(expected)),
        None => Ok(d.size.is_some()),
    }
}

pub async fn sha256_of(path: &Path) -> Result<String, FetchError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path).map_err(|e| FetchError::io(&path, e))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(|e| FetchError::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    })
    .await
    .map_err(|e| FetchError::Http(format!("hashing failed: {e}")))?
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    name: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(path: &Path, total: Option<u64>, done: u64) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let now = Instant::now();
        Self { name, total, done, started: now, last: now, tty: std::io::stderr().is_terminal() }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        let every = if self.tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        if self.last.elapsed() >= every {
            self.last = Instant::now();
            self.report();
        }
    }

    fn report(&self) {
        let mb = |b: u64| b as f64 / 1e6;
        let rate = mb(self.done) / self.started.elapsed().as_secs_f64().max(1e-3);
        let percent = self.total.map(|t| 100.0 * self.done as f64 / t.max(1) as f64);
        if self.tty {
            let width = 30;
            let filled = percent.map_or(0, |p| (p / 100.0 * width as f64) as usize).min(width);
            eprint!(
                "\r{} [{}{}] {:>5.1}% {:.1}/{} MB {:.1} MB/s",
                self.name,
                "#".repeat(filled),
                " ".repeat(width - filled),
                percent.unwrap_or(0.0),
                mb(self.done),
                self.total.map_or("?".to_string(), |t| format!("{:.1}", mb(t))),
                rate
            );
        } else {
            tracing::info!(file = %self.name, bytes = self.done, total = self.total, percent, mb_per_s = rate, "downloading");
        }
    }

    fn done(&self) {
        self.report();
        if self.tty {
            eprintln!();
        }
    }
}
