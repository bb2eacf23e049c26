//! Validated digests and the digest functions Outpost supports.
//!
//! A wire [`reapi::Digest`] is two untrusted strings/numbers; a [`Digest`] is
//! a checked one: a known function, a hash of the right length, a size that
//! is not negative. Everything past the service edge speaks [`Digest`].

use std::fmt;

use sha2::Digest as _;

use crate::reapi;

/// The digest functions this server accepts, in the order it advertises them.
pub const SUPPORTED: [Function; 2] = [Function::Sha256, Function::Blake3];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Function {
    Sha256,
    Blake3,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("digest function {0} is not supported; this server supports sha256 and blake3")]
    UnsupportedFunction(String),
    #[error("unknown digest function value {0}; this server supports sha256 (1) and blake3 (9)")]
    UnknownFunctionValue(i32),
    #[error("digest hash {hash:?} is not {expected} lower-case hex characters ({function})")]
    BadHash {
        hash: String,
        expected: usize,
        function: Function,
    },
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    #[error("digest size {0:?} is not a decimal number")]
    BadSize(String),
    #[error("digest {0:?} is not of the form HASH/SIZE")]
    BadForm(String),
    #[error("digest is missing")]
    Missing,
}

impl Function {
    /// Hash length in bytes (both supported functions produce 32).
    pub const HASH_LEN: usize = 32;

    /// Interprets a request's `digest_function` field. `UNKNOWN` (unset) means
    /// SHA-256, as the specification prescribes for 64-character hashes.
    pub fn from_proto(value: i32) -> Result<Function, Error> {
        use reapi::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Unknown | Value::Sha256) => Ok(Function::Sha256),
            Ok(Value::Blake3) => Ok(Function::Blake3),
            Ok(other) => Err(Error::UnsupportedFunction(
                other.as_str_name().to_ascii_lowercase(),
            )),
            Err(_) => Err(Error::UnknownFunctionValue(value)),
        }
    }

    pub fn to_proto(self) -> reapi::digest_function::Value {
        match self {
            Function::Sha256 => reapi::digest_function::Value::Sha256,
            Function::Blake3 => reapi::digest_function::Value::Blake3,
        }
    }

    /// The lower-case name used in ByteStream resource names.
    pub fn name(self) -> &'static str {
        match self {
            Function::Sha256 => "sha256",
            Function::Blake3 => "blake3",
        }
    }

    /// Parses a resource-name segment. `Ok(None)` when the segment names no
    /// digest function at all (it is then a hash).
    pub fn from_name(segment: &str) -> Result<Option<Function>, Error> {
        match segment {
            "sha256" => Ok(Some(Function::Sha256)),
            "blake3" => Ok(Some(Function::Blake3)),
            "sha1" | "md5" | "vso" | "sha384" | "sha512" | "murmur3" | "sha256tree" => {
                Err(Error::UnsupportedFunction(segment.to_owned()))
            }
            _ => Ok(None),
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Function::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Function::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The digest of `data` under this function.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish_with_size(data.len() as u64)
    }

    /// The digest of the empty blob, which every CAS holds implicitly.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Incremental hashing under one digest function.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// Finishes the hash; `size` is the number of bytes the caller fed.
    pub fn finish_with_size(self, size: u64) -> Digest {
        let (function, hash) = match self {
            Hasher::Sha256(h) => (Function::Sha256, h.finalize().into()),
            Hasher::Blake3(h) => (Function::Blake3, *h.finalize().as_bytes()),
        };
        Digest {
            function,
            hash,
            size,
        }
    }
}

/// A checked digest: known function, 32-byte hash, non-negative size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub function: Function,
    pub hash: [u8; Function::HASH_LEN],
    pub size: u64,
}

impl reapi::BatchUpdateBlobsRequest {
    /// A request uploading `blobs` uncompressed; `digest_function` as on
    /// the wire (0: unspecified, for servers older than REAPI 2.3).
    pub fn of(
        instance_name: &str,
        digest_function: i32,
        blobs: impl IntoIterator<Item = (Digest, bytes::Bytes)>,
    ) -> Self {
        reapi::BatchUpdateBlobsRequest {
            instance_name: instance_name.to_owned(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| reapi::batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: 0,
                })
                .collect(),
            digest_function,
        }
    }
}

impl Digest {
    /// Checks a wire digest under the request's digest function.
    pub fn from_proto(d: &reapi::Digest, function: Function) -> Result<Digest, Error> {
        let size = u64::try_from(d.size_bytes).map_err(|_| Error::NegativeSize(d.size_bytes))?;
        Ok(Digest {
            function,
            hash: parse_hash(&d.hash, function)?,
            size,
        })
    }

    /// Like [`Digest::from_proto`] for an optional field that must be set.
    pub fn from_proto_opt(d: Option<&reapi::Digest>, function: Function) -> Result<Digest, Error> {
        Digest::from_proto(d.ok_or(Error::Missing)?, function)
    }

    /// Parses `HASH/SIZE` as used in resource names and messages.
    pub fn parse(hash: &str, size: &str, function: Function) -> Result<Digest, Error> {
        Ok(Digest {
            function,
            hash: parse_hash(hash, function)?,
            size: parse_size(size)?,
        })
    }

    /// Parses the `HASH/SIZE` form in one string.
    pub fn parse_pair(s: &str, function: Function) -> Result<Digest, Error> {
        let (hash, size) = s
            .split_once('/')
            .ok_or_else(|| Error::BadForm(s.to_owned()))?;
        Digest::parse(hash, size, function)
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash_hex(),
            size_bytes: i64::try_from(self.size).expect("sizes come from i64 or files"),
        }
    }

    pub fn hash_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(Function::HASH_LEN * 2);
        for b in self.hash {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        out
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }
}

impl fmt::Display for Digest {
    /// `HASH/SIZE`, the form used in resource names and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.function, self)
    }
}

fn parse_hash(hash: &str, function: Function) -> Result<[u8; Function::HASH_LEN], Error> {
    // Lower-case hex only, one table lookup per character: this runs for
    // every digest of every request.
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0xff,
        }
    }
    const TABLE: [u8; 256] = {
        let mut t = [0xff; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = nibble(i as u8);
            i += 1;
        }
        t
    };
    let bad = || Error::BadHash {
        hash: hash.chars().take(80).collect(),
        expected: Function::HASH_LEN * 2,
        function,
    };
    let bytes = hash.as_bytes();
    if bytes.len() != Function::HASH_LEN * 2 {
        return Err(bad());
    }
    let mut out = [0u8; Function::HASH_LEN];
    let mut invalid = 0u8;
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let (hi, lo) = (TABLE[usize::from(pair[0])], TABLE[usize::from(pair[1])]);
        invalid |= (hi | lo) & 0xf0;
        out[i] = (hi << 4) | (lo & 0x0f);
    }
    if invalid != 0 {
        return Err(bad());
    }
    Ok(out)
}

/// Sizes are plain decimal: no sign, no spaces, no leading zeros but "0".
fn parse_size(size: &str) -> Result<u64, Error> {
    let bad = || Error::BadSize(size.chars().take(40).collect());
    if size.is_empty()
        || !size.bytes().all(|b| b.is_ascii_digit())
        || (size.len() > 1 && size.starts_with('0'))
    {
        return Err(bad());
    }
    let n: u64 = size.parse().map_err(|_| bad())?;
    if n > i64::MAX as u64 {
        return Err(bad());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_BLAKE3: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn empty_digests_are_the_published_ones() {
        assert_eq!(Function::Sha256.empty().hash_hex(), EMPTY_SHA256);
        assert_eq!(Function::Blake3.empty().hash_hex(), EMPTY_BLAKE3);
        assert!(Function::Sha256.empty().is_empty_blob());
    }

    #[test]
    fn digest_of_counts_size() {
        let d = Function::Sha256.digest_of(b"hello");
        assert_eq!(d.size, 5);
        assert_eq!(
            d.to_string(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824/5"
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        let f = Function::Sha256;
        assert!(Digest::parse(EMPTY_SHA256, "0", f).is_ok());
        assert!(Digest::parse(&EMPTY_SHA256.to_uppercase(), "0", f).is_err());
        assert!(Digest::parse(&EMPTY_SHA256[1..], "0", f).is_err());
        assert!(Digest::parse(EMPTY_SHA256, "-1", f).is_err());
        assert!(Digest::parse(EMPTY_SHA256, "+1", f).is_err());
        assert!(Digest::parse(EMPTY_SHA256, "01", f).is_err());
        assert!(Digest::parse(EMPTY_SHA256, "", f).is_err());
        assert!(Digest::parse(EMPTY_SHA256, "99999999999999999999", f).is_err());
        assert!(Digest::parse_pair("nohash", f).is_err());
        let neg = reapi::Digest {
            hash: EMPTY_SHA256.into(),
            size_bytes: -5,
        };
        assert_eq!(Digest::from_proto(&neg, f), Err(Error::NegativeSize(-5)));
    }

    #[test]
    fn function_values() {
        assert_eq!(Function::from_proto(0), Ok(Function::Sha256));
        assert_eq!(Function::from_proto(9), Ok(Function::Blake3));
        assert!(matches!(
            Function::from_proto(2),
            Err(Error::UnsupportedFunction(name)) if name == "sha1"
        ));
        assert_eq!(
            Function::from_proto(77),
            Err(Error::UnknownFunctionValue(77))
        );
        assert_eq!(Function::from_name("blake3"), Ok(Some(Function::Blake3)));
        assert_eq!(Function::from_name(EMPTY_SHA256), Ok(None));
        assert!(Function::from_name("md5").is_err());
    }
}
