//! Incremental detokenization: turns a growing list of token ids into text deltas,
//! never splitting a multi-byte character across deltas.

use tokenizers::Tokenizer;

#[derive(Debug)]
pub struct Detokenizer {
    /// Special tokens decode to nothing (vLLM's `skip_special_tokens`).
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context (spaces, merges).
    prefix_offset: usize,
    /// End of the text already released.
    read_offset: usize,
}

impl Detokenizer {
    pub fn new(skip_special: bool) -> Self {
        Self { skip_special, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds a token and returns the newly complete text, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, self.skip_special).map_err(|e| e.to_string());
        let before = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = decode(&self.ids[self.prefix_offset..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.is_char_boundary(before.len()) {
            return Ok(String::new());
        }
        let delta = now[before.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// The text of tokens not released yet (an unfinished character becomes U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, String> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, self.skip_special).map_err(|e| e.to_string());
        let before = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}
