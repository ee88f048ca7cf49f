//! Content digests (`sha256:<hex>`) and their verification.
//!
//! Everything lazylayer takes from a registry, a layout or a cache is named by a digest, and
//! nothing is used before its bytes have been checked against that name. This module is the one
//! place that parses and checks digests so that callers cannot forget the check: [`Digest::verify`]
//! returns an error that names both the expected and the actual digest.
//!
//! Only `sha256` is accepted. The OCI image spec also registers `sha512`, but no registry or tool
//! in our ecosystem emits it for images; accepting it would mean carrying a second hasher
//! everywhere for no user. An unknown algorithm is a clear parse error, not a silent pass.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A parsed, validated `sha256:` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// Lower-case hex of the 32-byte SHA-256, always 64 characters.
    hex: String,
}

/// Why a string is not a digest, or why bytes do not match one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("`{0}` is not a digest: expected `sha256:` followed by 64 lower-case hex characters")]
    Malformed(String),
    #[error("unsupported digest algorithm in `{0}`: only sha256 is supported")]
    UnsupportedAlgorithm(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    /// The 64 hex characters, without the algorithm prefix (the blob's file name in an OCI
    /// layout and in a registry's storage).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A short form for tables and logs (`sha256:` plus 12 hex characters), as `docker` prints.
    pub fn short(&self) -> String {
        format!("sha256:{}", &self.hex[..12])
    }

    /// Checks `bytes` against this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), DigestError> {
        let actual = Digest::of(bytes);
        if actual == *self {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: self.clone(),
                actual,
            })
        }
    }
}

/// Incremental hashing for content that arrives in pieces (streamed blobs).
#[derive(Default)]
pub struct DigestHasher(Sha256);

impl DigestHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest {
            hex: hex::encode(self.0.finalize()),
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.to_string()));
        };
        if algorithm != "sha256" {
            let known_shape = !algorithm.is_empty()
                && algorithm
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c));
            return Err(if known_shape {
                DigestError::UnsupportedAlgorithm(s.to_string())
            } else {
                DigestError::Malformed(s.to_string())
            });
        }
        let valid_hex = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid_hex {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input_is_the_well_known_value() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
    }

    #[test]
    fn parse_round_trips_and_rejects_bad_shapes() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.short(), "sha256:e3b0c44298fc");
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &EMPTY.to_uppercase(),
            &format!("{EMPTY}0"),
            "sha256:zz0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(
                matches!(bad.parse::<Digest>(), Err(DigestError::Malformed(_))),
                "{bad:?} should be malformed"
            );
        }
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn verify_names_both_digests_on_mismatch() {
        let d: Digest = EMPTY.parse().unwrap();
        d.verify(b"").unwrap();
        let err = d.verify(b"x").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(EMPTY), "{text}");
        assert!(text.contains(&Digest::of(b"x").to_string()), "{text}");
    }

    #[test]
    fn incremental_hash_equals_one_shot_hash() {
        let mut h = DigestHasher::default();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(b"hello world"));
    }
}
