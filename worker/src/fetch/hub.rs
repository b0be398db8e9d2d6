//! The Hugging Face Hub's file listing, and which files make a servable model.

use serde::Deserialize;

use super::FetchError;

/// One file of a repository revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
    /// SHA-256 of the content, known for files stored with LFS.
    pub sha256: Option<String>,
}

#[derive(Deserialize)]
struct Listing {
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: Option<String>,
    size: Option<u64>,
}

pub fn parse_listing(body: &[u8]) -> Result<Vec<RemoteFile>, FetchError> {
    let listing: Listing =
        serde_json::from_slice(body).map_err(|e| FetchError::Hub(format!("unexpected file listing: {e}")))?;
    Ok(listing
        .siblings
        .into_iter()
        .map(|s| RemoteFile {
            size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
            sha256: s.lfs.and_then(|l| l.sha256),
            name: s.rfilename,
        })
        .collect())
}

/// Files beside safetensors weights that loading and templating use.
const CHECKPOINT_FILES: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// The named file; else the repository's one GGUF file; else its safetensors checkpoint.
pub fn choose(files: &[RemoteFile], wanted: Option<&str>, repo: &str) -> Result<Vec<RemoteFile>, FetchError> {
    if let Some(name) = wanted {
        return files
            .iter()
            .find(|f| f.name == name)
            .map(|f| vec![f.clone()])
            .ok_or_else(|| FetchError::NotFound(format!("{repo} has no file {name}")));
    }
    let ggufs: Vec<&RemoteFile> = files.iter().filter(|f| f.name.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => return Ok(vec![(*one).clone()]),
        [] => {}
        many => {
            let names: Vec<&str> = many.iter().map(|f| f.name.as_str()).collect();
            return Err(FetchError::BadSource(format!(
                "{repo} holds several GGUF files; name one, e.g. hf://{repo}/{}: {}",
                names[0],
                names.join(", ")
            )));
        }
    }
    let weights: Vec<RemoteFile> = files.iter().filter(|f| f.name.ends_with(".safetensors")).cloned().collect();
    if weights.is_empty() || !files.iter().any(|f| f.name == "config.json") {
        return Err(FetchError::NotFound(format!("{repo} has neither a GGUF file nor a safetensors checkpoint")));
    }
    let mut chosen: Vec<RemoteFile> =
        files.iter().filter(|f| CHECKPOINT_FILES.contains(&f.name.as_str())).cloned().collect();
    chosen.extend(weights);
    Ok(chosen)
}
