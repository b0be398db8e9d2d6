//! The grammar of model source URLs (`spec.source.url`, `kandle-worker fetch URL`):
//! a regular expression for the CRD schema and a parser for the code, tested to
//! agree.
//!
//! - `hf://org/repo[/path/in/repo][@revision]`: the Hugging Face Hub;
//! - `https://host/path`: one file;
//! - `http://host/path`: one file, only with a SHA-256 that pins it (an internal
//!   mirror without TLS: the hash makes the download safe);
//! - `pvc://claim[/path/in/claim]`: a PersistentVolumeClaim (Kubernetes' PVC name rules);
//! - `file:///path`: a path inside the worker container (baked into the image).
//!
//! Path segments may not be `.` or `..`, so no source points outside its root.
//!
//! Downloaded sources (`hf://`, `https://`, `http://`) each get a directory of
//! their own under a cache root ([`hub_dir`], [`url_dir`]); a Hub source's
//! directory names the revision that is fetched ([`hub_revision`]), so two
//! revisions of one repository never share files.

/// The same grammar as one regular expression (RE2 syntax, no look-around), for
/// the CRD schema's `pattern`.
pub const PATTERN: &str = concat!(
    r"^(",
    r"hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}",
    r"(/([^\s/@.][^\s/@]*|\.[^\s/@.][^\s/@]*|\.\.[^\s/@]+))*(@[A-Za-z0-9_-][A-Za-z0-9._-]*)?",
    r"|https?://[^\s/]+(/[^\s]*)?",
    r"|pvc://[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?(/([^\s/.][^\s/]*|\.[^\s/.][^\s/]*|\.\.[^\s/]+))*/?",
    r"|file:///[^\s]*",
    r")$",
);

/// The Hub revision fetched when neither the source nor its URL names one.
pub const DEFAULT_REVISION: &str = "main";

/// A Hub revision (`@revision` in a URL, `spec.source.revision`, `--revision`):
/// a branch, tag or commit of letters, digits, `.`, `_` and `-`, not starting
/// with `.`, so it can name a directory.
pub const REVISION_PATTERN: &str = r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$";

/// The rule that an `http://` source carries a sha256, as a CEL expression over
/// `spec.source` for the CRD schema ([`SourceUrl::check_pinned`] is the same rule
/// in code).
pub const HTTP_NEEDS_SHA256: &str = "!self.url.startsWith('http://') || has(self.sha256)";
pub const HTTP_NEEDS_SHA256_MESSAGE: &str =
    "an http:// source needs sha256: without TLS, only the hash proves the download is the model";

/// Where `pvc://` sources are mounted in a worker pod.
pub const PVC_MOUNT: &str = "/var/lib/kandle/models";

/// A parsed source URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    Hub {
        org: String,
        repo: String,
        /// A file or directory inside the repository.
        file: Option<String>,
        revision: Option<String>,
    },
    Https(String),
    /// Plain HTTP: fetched only with a sha256 ([`SourceUrl::check_pinned`]).
    Http(String),
    Pvc {
        claim: String,
        /// Path inside the claim, without leading or trailing `/` (empty: the whole claim).
        path: String,
    },
    /// An absolute path in the container.
    File(String),
}

/// Why a URL is not a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub url: String,
    pub reason: &'static str,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.url, self.reason)
    }
}

impl std::error::Error for SourceError {}

const SCHEMES: &str = "the scheme must be hf://, https://, http:// (with a sha256), pvc:// or file://";

impl SourceUrl {
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let bad = |reason| Err(SourceError { url: url.to_string(), reason });
        if url.chars().any(char::is_whitespace) {
            return bad("URLs may not contain whitespace");
        }
        if let Some(rest) = url.strip_prefix("hf://") {
            let (path, revision) = match rest.split_once('@') {
                Some((_, r)) if !valid_revision(r) => {
                    return bad("the revision after @ must be letters, digits, '.', '_' or '-', not starting with '.'")
                }
                Some((p, r)) => (p, Some(r.to_string())),
                None => (rest, None),
            };
            let mut parts = path.splitn(3, '/');
            let (org, repo) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !valid_hub_name(org) || !valid_hub_name(repo) {
                return bad("expected hf://org/repo[/file][@revision] with Hub names (letters, digits, '.', '_', '-')");
            }
            let file = match parts.next() {
                None => None,
                Some(f) if f.split('/').all(valid_segment) => Some(f.to_string()),
                Some(_) => return bad("path segments may not be empty, '.' or '..'"),
            };
            return Ok(Self::Hub { org: org.into(), repo: repo.into(), file, revision });
        }
        if let Some(rest) = url.strip_prefix("https://") {
            let host = rest.split('/').next().unwrap_or("");
            return if host.is_empty() { bad("expected https://host/path") } else { Ok(Self::Https(url.into())) };
        }
        if let Some(rest) = url.strip_prefix("http://") {
            let host = rest.split('/').next().unwrap_or("");
            return if host.is_empty() { bad("expected http://host/path") } else { Ok(Self::Http(url.into())) };
        }
        if let Some(rest) = url.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_claim(claim) {
                return bad("the claim must be a PersistentVolumeClaim name (lowercase letters, digits, '-', '.')");
            }
            let trimmed = if path.is_empty() { path } else { path.strip_suffix('/').unwrap_or(path) };
            if !path.is_empty() && !trimmed.split('/').all(valid_segment) {
                return bad("path segments may not be empty, '.' or '..'");
            }
            return Ok(Self::Pvc { claim: claim.into(), path: trimmed.into() });
        }
        if let Some(path) = url.strip_prefix("file://") {
            return if path.starts_with('/') {
                Ok(Self::File(path.into()))
            } else {
                bad("file:// URLs need an absolute path (file:///path)")
            };
        }
        bad(SCHEMES)
    }

    /// Whether the source may be fetched with this expected hash: a plain
    /// `http://` source only with one (the CRD's [`HTTP_NEEDS_SHA256`]).
    pub fn check_pinned(&self, sha256: Option<&str>) -> Result<(), SourceError> {
        match self {
            Self::Http(url) if sha256.is_none_or(str::is_empty) => {
                Err(SourceError { url: url.clone(), reason: HTTP_NEEDS_SHA256_MESSAGE })
            }
            _ => Ok(()),
        }
    }
}

fn valid_hub_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 96
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The revision a Hub source is fetched at: `explicit` (`spec.source.revision`,
/// `--revision`) over the URL's `@revision`, else [`DEFAULT_REVISION`].
pub fn hub_revision<'a>(url_revision: Option<&'a str>, explicit: Option<&'a str>) -> Result<&'a str, SourceError> {
    match explicit {
        Some(rev) if !valid_revision(rev) => Err(SourceError {
            url: rev.to_string(),
            reason: "a revision must be letters, digits, '.', '_' or '-', not starting with '.'",
        }),
        Some(rev) => Ok(rev),
        None => Ok(url_revision.unwrap_or(DEFAULT_REVISION)),
    }
}

/// The directory, under a cache root, of a Hub repository at a revision.
pub fn hub_dir(org: &str, repo: &str, revision: &str) -> String {
    format!("hf/{org}/{repo}/{revision}")
}

/// The directory, under a cache root, of a file fetched by URL: named by a hash
/// of the whole URL, so each URL has its own.
pub fn url_dir(url: &str) -> String {
    format!("url/{:016x}", fnv1a(url))
}

/// A stable 64-bit FNV-1a hash.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn valid_revision(rev: &str) -> bool {
    !rev.is_empty() && !rev.starts_with('.') && rev.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Kubernetes' PersistentVolumeClaim names: DNS subdomains (RFC 1123).
fn valid_claim(claim: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    claim.len() <= 253
        && edge(claim.chars().next())
        && edge(claim.chars().last())
        && claim.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn valid_segment(segment: &str) -> bool {
    !matches!(segment, "" | "." | "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            SourceUrl::parse("hf://org/repo/sub/model.Q4_K_M.gguf@v1.0"),
            Ok(SourceUrl::Hub {
                org: "org".into(),
                repo: "repo".into(),
                file: Some("sub/model.Q4_K_M.gguf".into()),
                revision: Some("v1.0".into()),
            })
        );
        assert_eq!(SourceUrl::parse("https://h/m.gguf"), Ok(SourceUrl::Https("https://h/m.gguf".into())));
        assert_eq!(SourceUrl::parse("http://h:8080/m.gguf"), Ok(SourceUrl::Http("http://h:8080/m.gguf".into())));
        assert_eq!(
            SourceUrl::parse("pvc://models.v2/a/m.gguf"),
            Ok(SourceUrl::Pvc { claim: "models.v2".into(), path: "a/m.gguf".into() })
        );
        assert_eq!(SourceUrl::parse("pvc://models/"), Ok(SourceUrl::Pvc { claim: "models".into(), path: "".into() }));
        assert_eq!(SourceUrl::parse("file:///models/m.gguf"), Ok(SourceUrl::File("/models/m.gguf".into())));
    }

    /// The schema's pattern and the parser accept exactly the same URLs.
    #[test]
    fn pattern_and_parser_agree() {
        let pattern = regex::Regex::new(PATTERN).expect("pattern compiles");
        let long_claim = format!("pvc://{}/m", "a".repeat(253));
        let too_long_claim = format!("pvc://{}/m", "a".repeat(254));
        let cases = [
            "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
            "hf://org/repo/sub/model.gguf@v1.0",
            "hf://org/repo@main",
            "hf://org/repo/.hidden/m",
            "hf://org/repo/..x/m",
            "hf://org/repo/../x",
            "hf://org/repo/./x",
            "hf://org/repo//x",
            "hf://org/repo@",
            "hf://org/repo@.hidden",
            "hf://org/repo@a/b",
            "hf://justorg",
            "hf://-org/repo",
            "https://example.com/m.gguf",
            "https://example.com",
            "https:///m.gguf",
            "http://example.com/m.gguf",
            "http://10.0.0.7:8080/models/m.gguf",
            "http://",
            "http:///m.gguf",
            "pvc://models/m.gguf",
            "pvc://models.v2/dir/m.gguf",
            "pvc://models",
            "pvc://models/",
            "pvc://Models/m",
            "pvc://-models/m",
            "pvc://models./m",
            "pvc:///m.gguf",
            "pvc://models/../etc",
            "pvc://models/a//b",
            "pvc://models//",
            "pvc://models/a/",
            &long_claim,
            &too_long_claim,
            "file:///models/m.gguf",
            "file://models/m.gguf",
            "file:///with space",
            "s3://bucket/key",
            "",
        ];
        for url in cases {
            assert_eq!(pattern.is_match(url), SourceUrl::parse(url).is_ok(), "{url:?}: {:?}", SourceUrl::parse(url));
        }
    }

    #[test]
    fn the_explicit_revision_wins_and_names_the_directory() {
        assert_eq!(hub_revision(None, None), Ok("main"));
        assert_eq!(hub_revision(Some("v1"), None), Ok("v1"));
        assert_eq!(hub_revision(Some("v1"), Some("v2")), Ok("v2"));
        for bad in ["", "../x", "a/b", ".hidden", "with space"] {
            assert!(hub_revision(None, Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(hub_dir("org", "repo", "v2"), "hf/org/repo/v2");
        assert_ne!(hub_dir("org", "repo", "v1"), hub_dir("org", "repo", "v2"));
        assert_ne!(url_dir("https://h/a.gguf"), url_dir("https://h/b.gguf"));
        assert_eq!(url_dir("https://h/a.gguf"), url_dir("https://h/a.gguf"));
    }

    /// The revision pattern of the CRD and the parser accept the same names.
    #[test]
    fn revision_pattern_and_parser_agree() {
        let pattern = regex::Regex::new(REVISION_PATTERN).expect("pattern compiles");
        for rev in ["main", "v1.0", "a1b2c3", "_x", "-x", "", ".x", "..", "a/b", "a b", "é"] {
            assert_eq!(pattern.is_match(rev), valid_revision(rev), "{rev:?}");
        }
    }

    #[test]
    fn plain_http_needs_a_pinned_hash() {
        let sha = "a".repeat(64);
        let http = SourceUrl::parse("http://mirror/m.gguf").expect("parses");
        assert_eq!(http.check_pinned(Some(&sha)), Ok(()));
        for missing in [None, Some("")] {
            let err = http.check_pinned(missing).expect_err("refused");
            assert!(err.to_string().contains("needs sha256"), "{err}");
        }
        for url in ["https://h/m.gguf", "hf://o/r", "pvc://c/m", "file:///m"] {
            assert_eq!(SourceUrl::parse(url).expect("parses").check_pinned(None), Ok(()), "{url}");
        }
    }
}
