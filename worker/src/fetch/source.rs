//! Model source URLs: `hf://org/repo[/file][@revision]`, `https://…`, `file:///…`,
//! `pvc://claim/path`.

use super::FetchError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Hub {
        repo: String,
        file: Option<String>,
        revision: Option<String>,
    },
    Https(String),
    /// A path that must already exist (`file://`, or a `pvc://` path under its mount).
    Local(std::path::PathBuf),
}

/// Where `pvc://claim/path` sources are mounted in a worker pod.
pub const PVC_ROOT: &str = "/var/lib/kandle/models";

pub fn parse(url: &str) -> Result<Source, FetchError> {
    let bad = |why: &str| FetchError::BadSource(format!("{url}: {why}"));
    if let Some(rest) = url.strip_prefix("hf://") {
        let (path, revision) = match rest.split_once('@') {
            Some((p, r)) if !r.is_empty() => (p, Some(r.to_string())),
            Some(_) => return Err(bad("empty revision after @")),
            None => (rest, None),
        };
        let mut parts = path.splitn(3, '/');
        let (org, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if org.is_empty() || name.is_empty() {
            return Err(bad("expected hf://org/repo[/file][@revision]"));
        }
        let file = parts.next().filter(|f| !f.is_empty()).map(str::to_string);
        if file.as_deref().is_some_and(|f| f.split('/').any(|s| s == "..")) {
            return Err(bad("file paths may not contain .."));
        }
        return Ok(Source::Hub { repo: format!("{org}/{name}"), file, revision });
    }
    if url.starts_with("https://") {
        return Ok(Source::Https(url.to_string()));
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad("file:// URLs need an absolute path (file:///path)"));
        }
        return Ok(Source::Local(path.into()));
    }
    if let Some(rest) = url.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        if claim.is_empty() {
            return Err(bad("expected pvc://claim/path"));
        }
        return Ok(Source::Local(std::path::Path::new(PVC_ROOT).join(path)));
    }
    Err(bad("the scheme must be hf://, https://, file:// or pvc://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct").expect("ok"),
            Source::Hub { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), file: None, revision: None }
        );
        assert_eq!(
            parse("hf://org/repo/sub/model.Q4_K_M.gguf@v1.0").expect("ok"),
            Source::Hub {
                repo: "org/repo".into(),
                file: Some("sub/model.Q4_K_M.gguf".into()),
                revision: Some("v1.0".into())
            }
        );
        assert_eq!(parse("https://h/m.gguf").expect("ok"), Source::Https("https://h/m.gguf".into()));
        assert_eq!(parse("file:///models/m.gguf").expect("ok"), Source::Local("/models/m.gguf".into()));
        assert_eq!(parse("pvc://cache/a/m.gguf").expect("ok"), Source::Local("/var/lib/kandle/models/a/m.gguf".into()));
    }

    #[test]
    fn rejects_what_it_cannot_fetch() {
        for url in
            ["http://h/m.gguf", "hf://onlyorg", "hf://o/r@", "hf://o/r/../x", "file://rel", "pvc:///x", "s3://b/k"]
        {
            assert!(parse(url).is_err(), "{url}");
        }
    }
}
