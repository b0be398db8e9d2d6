//! `kandle-worker fetch` against a local HTTP server laid out like the Hugging Face
//! Hub's file endpoints: a listing with LFS hashes, `resolve` URLs that redirect,
//! and file content that honours Range requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use kandle_worker::fetch::{self, FetchConfig, FetchError};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Default)]
struct Hub {
    files: HashMap<String, Vec<u8>>,
    /// Advertised hashes (normally the real ones).
    hashes: HashMap<String, String>,
    /// Range headers received, by file.
    ranges: Mutex<Vec<(String, Option<String>)>>,
    /// Files whose next full download breaks off halfway.
    break_once: Mutex<Vec<String>>,
    /// How long every file download waits before its first byte.
    first_byte_delay: std::time::Duration,
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn listing(State(hub): State<Arc<Hub>>, Path((org, repo, rev)): Path<(String, String, String)>) -> Response {
    if (org.as_str(), repo.as_str(), rev.as_str()) != ("org", "repo", "main") {
        return (StatusCode::NOT_FOUND, "no such repo").into_response();
    }
    let siblings: Vec<_> = hub
        .files
        .iter()
        .map(|(name, bytes)| {
            json!({"rfilename": name, "size": bytes.len(),
                   "lfs": {"sha256": hub.hashes.get(name).cloned().unwrap_or_else(|| sha(bytes)), "size": bytes.len()}})
        })
        .collect();
    axum::Json(json!({"siblings": siblings})).into_response()
}

async fn resolve(Path((_org, _repo, _rev, file)): Path<(String, String, String, String)>) -> Redirect {
    Redirect::temporary(&format!("/cdn/{file}"))
}

async fn cdn(State(hub): State<Arc<Hub>>, Path(file): Path<String>, headers: HeaderMap) -> Response {
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    hub.ranges.lock().expect("lock").push((file.clone(), range.clone()));
    let Some(bytes) = hub.files.get(&file).cloned() else {
        return (StatusCode::NOT_FOUND, "missing").into_response();
    };
    tokio::time::sleep(hub.first_byte_delay).await;
    if let Some(start) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.strip_suffix('-')) {
        let start: usize = start.parse().unwrap_or(0);
        if start >= bytes.len() {
            return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
        }
        let rest = bytes[start..].to_vec();
        let content_range = format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len());
        return (StatusCode::PARTIAL_CONTENT, [(header::CONTENT_RANGE, content_range)], rest).into_response();
    }
    let breaks = {
        let mut list = hub.break_once.lock().expect("lock");
        let found = list.iter().position(|f| *f == file);
        found.map(|i| list.remove(i)).is_some()
    };
    if breaks {
        let half = axum::body::Bytes::from(bytes[..bytes.len() / 2].to_vec());
        // The first half reaches the client before the connection breaks.
        let stream = futures::stream::unfold(Some(half), |state| async move {
            match state {
                Some(half) => Some((Ok(half), None)),
                None => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Some((Err(std::io::Error::other("connection reset")), None))
                }
            }
        })
        .take(2);
        return (StatusCode::OK, [(header::CONTENT_LENGTH, bytes.len().to_string())], Body::from_stream(stream))
            .into_response();
    }
    bytes.into_response()
}

async fn serve(hub: Hub) -> (String, Arc<Hub>) {
    let hub = Arc::new(hub);
    let app = Router::new()
        .route("/api/models/{org}/{repo}/revision/{rev}", get(listing))
        .route("/{org}/{repo}/resolve/{rev}/{*file}", get(resolve))
        .route("/cdn/{*file}", get(cdn))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), hub)
}

/// A Hub whose repository holds one file, `m.gguf`.
async fn serve_one(gguf: &[u8]) -> (String, Arc<Hub>) {
    serve(Hub { files: HashMap::from([("m.gguf".into(), gguf.to_vec())]), ..Hub::default() }).await
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn config(endpoint: &str, url: &str, dest: &std::path::Path) -> FetchConfig {
    FetchConfig {
        url: url.into(),
        dest: dest.to_path_buf(),
        revision: None,
        sha256: None,
        token: None,
        endpoint: endpoint.into(),
    }
}

#[tokio::test]
async fn downloads_a_named_gguf_through_redirects_and_checks_its_hash() {
    let gguf = content(300_000, 1);
    let (endpoint, _hub) = serve_one(&gguf).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let path = fetch::run(&config(&endpoint, "hf://org/repo/m.gguf", dest.path())).await.expect("fetched");
    assert_eq!(path, dest.path().join("m.gguf"));
    assert_eq!(std::fs::read(&path).expect("file"), gguf);
    // Fetching again finds it complete and downloads nothing.
    fetch::run(&config(&endpoint, "hf://org/repo", dest.path())).await.expect("fetched again");
}

#[tokio::test]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let gguf = content(400_000, 2);
    let hub = Hub {
        files: HashMap::from([("m.gguf".into(), gguf.clone())]),
        break_once: Mutex::new(vec!["m.gguf".into()]),
        ..Hub::default()
    };
    let (endpoint, hub) = serve(hub).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let first = fetch::run(&config(&endpoint, "hf://org/repo/m.gguf", dest.path())).await;
    assert!(matches!(first, Err(FetchError::Http(_))), "{first:?}");
    assert!(!dest.path().join("m.gguf").exists(), "a broken download must not look complete");
    let part = std::fs::metadata(dest.path().join("m.gguf.part")).expect("part kept").len();
    assert!(part > 0 && part < gguf.len() as u64);

    fetch::run(&config(&endpoint, "hf://org/repo/m.gguf", dest.path())).await.expect("resumed");
    assert_eq!(std::fs::read(dest.path().join("m.gguf")).expect("file"), gguf);
    assert!(!dest.path().join("m.gguf.part").exists());
    let ranges = hub.ranges.lock().expect("lock").clone();
    assert_eq!(ranges.last(), Some(&("m.gguf".to_string(), Some(format!("bytes={part}-")))));
}

#[tokio::test]
async fn a_checksum_mismatch_leaves_no_model() {
    let hub = Hub {
        files: HashMap::from([("m.gguf".into(), content(50_000, 3))]),
        hashes: HashMap::from([("m.gguf".into(), "0".repeat(64))]),
        ..Hub::default()
    };
    let (endpoint, _hub) = serve(hub).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch::run(&config(&endpoint, "hf://org/repo/m.gguf", dest.path())).await.expect_err("mismatch");
    assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("expected sha256 000"), "{err}");
    assert!(!dest.path().join("m.gguf").exists());
    assert!(!dest.path().join("m.gguf.part").exists());
}

#[tokio::test]
async fn missing_files_and_repositories_are_clear_errors() {
    let (endpoint, _hub) =
        serve(Hub { files: HashMap::from([("m.gguf".into(), content(10, 4))]), ..Hub::default() }).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch::run(&config(&endpoint, "hf://org/repo/other.gguf", dest.path())).await.expect_err("missing");
    assert!(err.to_string().contains("org/repo has no file other.gguf"), "{err}");
    let err = fetch::run(&config(&endpoint, "hf://org/nope", dest.path())).await.expect_err("no repo");
    assert!(matches!(err, FetchError::NotFound(_)), "{err}");
    let err =
        fetch::run(&config(&endpoint, "file:///definitely/not/here.gguf", dest.path())).await.expect_err("no file");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(std::fs::read_dir(dest.path()).expect("dir").count(), 0, "nothing written");
}

#[tokio::test]
async fn a_safetensors_checkpoint_is_fetched_as_a_directory() {
    let files = HashMap::from([
        ("config.json".to_string(), b"{}".to_vec()),
        ("tokenizer.json".to_string(), b"{}".to_vec()),
        ("model-00001-of-00002.safetensors".to_string(), content(1000, 5)),
        ("model-00002-of-00002.safetensors".to_string(), content(1000, 6)),
        ("README.md".to_string(), b"hello".to_vec()),
    ]);
    let (endpoint, _hub) = serve(Hub { files, ..Hub::default() }).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let path = fetch::run(&config(&endpoint, "hf://org/repo@main", dest.path())).await.expect("fetched");
    assert_eq!(path, dest.path());
    // Beside each file, the lock that fetches sharing the directory take turns on.
    let mut names: Vec<String> = std::fs::read_dir(dest.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into())
        .filter(|name: &String| !name.ends_with(".lock"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]
    );
}

#[tokio::test]
async fn plain_http_is_fetched_only_when_a_sha256_pins_it() {
    let gguf = content(20_000, 7);
    let (endpoint, _hub) = serve_one(&gguf).await;
    let url = format!("{endpoint}/cdn/m.gguf");
    assert!(url.starts_with("http://"));
    let dest = tempfile::tempdir().expect("tempdir");
    let err = fetch::run(&config(&endpoint, &url, dest.path())).await.expect_err("unpinned");
    assert!(matches!(err, FetchError::BadSource(_)) && err.to_string().contains("needs sha256"), "{err}");
    assert_eq!(std::fs::read_dir(dest.path()).expect("dir").count(), 0, "nothing fetched");

    let pinned = FetchConfig { sha256: Some(sha(&gguf)), ..config(&endpoint, &url, dest.path()) };
    let path = fetch::run(&pinned).await.expect("fetched");
    assert_eq!(std::fs::read(path).expect("file"), gguf);

    let wrong = FetchConfig {
        sha256: Some("0".repeat(64)),
        ..config(&endpoint, &url, tempfile::tempdir().expect("tempdir").path())
    };
    assert!(matches!(fetch::run(&wrong).await, Err(FetchError::ChecksumMismatch { .. })));
}

/// The revision fetched is the contract's (`--revision` over the URL's `@rev`),
/// the one the operator names the cache directory by; a revision that could not
/// name a directory is refused as a bad source, and nothing is downloaded.
#[tokio::test]
async fn the_explicit_revision_is_fetched_and_checked() {
    let gguf = content(1_000, 8);
    let (endpoint, hub) = serve_one(&gguf).await;
    let dest = tempfile::tempdir().expect("tempdir");
    // The test Hub knows only `main`: the URL's v9 loses to --revision main.
    let explicit =
        FetchConfig { revision: Some("main".into()), ..config(&endpoint, "hf://org/repo/m.gguf@v9", dest.path()) };
    let path = fetch::run(&explicit).await.expect("fetched at main");
    assert_eq!(std::fs::read(path).expect("file"), gguf);
    let asked = hub.ranges.lock().expect("lock").len();
    for bad in ["../x", "a/b", ".hidden"] {
        let escaping = FetchConfig { revision: Some(bad.into()), ..config(&endpoint, "hf://org/repo", dest.path()) };
        let err = fetch::run(&escaping).await.expect_err("refused");
        assert!(matches!(err, FetchError::BadSource(_)), "{bad}: {err}");
    }
    assert_eq!(hub.ranges.lock().expect("lock").len(), asked, "nothing downloaded for a refused revision");
}

/// Two fetches of one file into one directory at once (two pods' init
/// containers on a shared cache claim): one downloads, the other waits for it
/// and finds the finished file.
#[tokio::test]
async fn concurrent_fetches_of_one_file_download_it_once() {
    let gguf = content(200_000, 9);
    let hub = Hub {
        files: HashMap::from([("m.gguf".into(), gguf.clone())]),
        first_byte_delay: std::time::Duration::from_millis(300),
        ..Hub::default()
    };
    let (endpoint, hub) = serve(hub).await;
    let dest = tempfile::tempdir().expect("tempdir");
    let fetch = config(&endpoint, "hf://org/repo/m.gguf", dest.path());
    let (a, b) = tokio::join!(fetch::run(&fetch), fetch::run(&fetch));
    for path in [a.expect("first fetch"), b.expect("second fetch")] {
        assert_eq!(std::fs::read(path).expect("file"), gguf);
    }
    assert_eq!(hub.ranges.lock().expect("lock").len(), 1, "one download, not two");
    assert!(!dest.path().join("m.gguf.part").exists());
}
