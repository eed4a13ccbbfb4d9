//! [`KeyBytes`]: a registry key's bytes, kept in the key's own slot when short.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// The most bytes kept inline: with the tag and the length, a key is three words, the
/// size of the index records it is copied into.
pub(crate) const INLINE_KEY: usize = 22;

/// The bytes of a registry key (the NIF's encoding of a worker id). Up to
/// 22 bytes (`INLINE_KEY`) live in the key itself, so a lookup compares them where the hash
/// table's slot is, without following a pointer, and the key allocates nothing; longer
/// ones are shared on the heap (the entry and its index records hold one copy).
///
/// It hashes and compares as its bytes, so a registry keyed by it is searched with a
/// `&[u8]`.
#[derive(Clone)]
pub struct KeyBytes(Repr);

/// Private, so that an inline length is always one [`KeyBytes::new`] checked.
#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Shared(Arc<[u8]>),
}

impl KeyBytes {
    pub fn new(bytes: &[u8]) -> KeyBytes {
        if bytes.len() <= INLINE_KEY {
            let mut inline = [0; INLINE_KEY];
            inline[..bytes.len()].copy_from_slice(bytes);
            KeyBytes(Repr::Inline {
                len: bytes.len() as u8,
                bytes: inline,
            })
        } else {
            KeyBytes(Repr::Shared(bytes.into()))
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }
}

impl Deref for KeyBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for KeyBytes {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for KeyBytes {
    fn eq(&self, other: &KeyBytes) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for KeyBytes {}

impl Hash for KeyBytes {
    /// As `[u8]` hashes, which `Borrow<[u8]>` requires.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_bytes(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn three_words_and_inline_up_to_the_limit() {
        assert_eq!(size_of::<KeyBytes>(), 24);
        assert!(matches!(
            KeyBytes::new(&[7; INLINE_KEY]).0,
            Repr::Inline { .. }
        ));
        assert!(matches!(
            KeyBytes::new(&[7; INLINE_KEY + 1]).0,
            Repr::Shared(_)
        ));
        assert!(matches!(KeyBytes::new(&[]).0, Repr::Inline { len: 0, .. }));
    }

    #[test]
    fn keeps_its_bytes_and_is_found_by_them() {
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            b"worker_1".to_vec(),
            vec![0; INLINE_KEY],
            vec![0; INLINE_KEY + 1],
            (0..=255).collect(),
        ];
        let mut map = HashMap::new();
        for (i, bytes) in samples.iter().enumerate() {
            let key = KeyBytes::new(bytes);
            assert_eq!(key.as_bytes(), &bytes[..]);
            assert_eq!(&*key.clone(), &bytes[..]);
            map.insert(key, i);
        }
        for (i, bytes) in samples.iter().enumerate() {
            assert_eq!(map.get(&bytes[..]), Some(&i), "{bytes:?}");
        }
        // A prefix padded with zeros inline is another key.
        assert_eq!(map.get(&[0u8; 5][..]), None);
    }
}
