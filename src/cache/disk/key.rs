//! What names a cache entry: a [`Key`] is BLAKE3 over length-prefixed parts (and the cache's
//! format version), built by the caller from whatever identifies the content; the cache never
//! looks inside. Its hex form is the entry's file name.

use super::FORMAT;

/// A content identity: BLAKE3 of length-prefixed parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub(super) fn parse(hex: &str) -> Option<Key> {
        if hex.len() != 64 {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }
}

/// Builds a [`Key`] from the parts that identify some content.
pub struct KeyBuilder(blake3::Hasher);

impl KeyBuilder {
    /// `domain` keeps keys of different kinds of content apart.
    pub fn new(domain: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&FORMAT.to_le_bytes());
        let mut b = KeyBuilder(h);
        b.part(domain.as_bytes());
        b
    }
    /// Add one part (length-prefixed, so parts cannot run into each other).
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    pub fn finish(&self) -> Key {
        Key(*self.0.finalize().as_bytes())
    }
}
