//! ByteStream resource names for CAS blobs, parsed strictly.
//!
//! ```text
//! read:   [INSTANCE/]blobs/[FUNCTION/]HASH/SIZE
//!         [INSTANCE/]compressed-blobs/COMPRESSOR/[FUNCTION/]HASH/SIZE
//! write:  [INSTANCE/]uploads/UUID/blobs/[FUNCTION/]HASH/SIZE[/METADATA...]
//!         [INSTANCE/]uploads/UUID/compressed-blobs/COMPRESSOR/[FUNCTION/]HASH/SIZE[/METADATA...]
//! ```
//! The instance name is every segment before the first `blobs`, `uploads` or
//! `compressed-blobs` segment. Without a FUNCTION segment the digest function
//! is SHA-256. The digest of a compressed resource is that of the
//! uncompressed bytes.

use std::fmt;

use crate::digest::{self, Digest, Function};

/// How a blob's bytes travel on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    Identity,
    Zstd,
}

impl Compressor {
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Identity => "identity",
            Compressor::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("resource name {name:?} is malformed: {why}")]
    Malformed { name: String, why: &'static str },
    #[error("resource name {name:?}: compressor {compressor:?} is not supported; use zstd")]
    UnsupportedCompressor { name: String, compressor: String },
    #[error("resource name {name:?}: {source}")]
    Digest {
        name: String,
        #[source]
        source: digest::Error,
    },
}

/// A parsed read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    pub instance_name: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

/// A parsed write resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    pub instance_name: String,
    pub upload_id: String,
    pub compressor: Compressor,
    pub digest: Digest,
}

const MAX_NAME_LEN: usize = 4096;
const MAX_UPLOAD_ID_LEN: usize = 128;

pub fn parse_read(name: &str) -> Result<ReadResource, Error> {
    let segs = segments(name)?;
    let (instance_name, rest) = split_instance(name, &segs)?;
    let (compressor, digest, trailing) = parse_blob_part(name, rest)?;
    if !trailing.is_empty() {
        return Err(malformed(name, "unexpected segments after the size"));
    }
    Ok(ReadResource {
        instance_name,
        compressor,
        digest,
    })
}

pub fn parse_write(name: &str) -> Result<WriteResource, Error> {
    let segs = segments(name)?;
    let (instance_name, rest) = split_instance(name, &segs)?;
    let [uploads, upload_id, rest @ ..] = rest else {
        return Err(malformed(name, "expected uploads/UUID/blobs/HASH/SIZE"));
    };
    if *uploads != "uploads" {
        return Err(malformed(name, "a write needs an uploads/UUID/ prefix"));
    }
    if upload_id.len() > MAX_UPLOAD_ID_LEN
        || !upload_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(malformed(name, "the upload id must be a UUID"));
    }
    // Anything after the size is optional metadata the client may attach.
    let (compressor, digest, _metadata) = parse_blob_part(name, rest)?;
    Ok(WriteResource {
        instance_name,
        upload_id: (*upload_id).to_owned(),
        compressor,
        digest,
    })
}

/// The name to read `digest` under (what clients send).
pub fn read_name(instance_name: &str, digest: &Digest, compressor: Compressor) -> String {
    format!(
        "{}{}",
        instance_prefix(instance_name),
        blob_part(digest, compressor)
    )
}

/// The name to upload `digest` under (what clients send).
pub fn write_name(
    instance_name: &str,
    upload_id: &str,
    digest: &Digest,
    compressor: Compressor,
) -> String {
    format!(
        "{}uploads/{upload_id}/{}",
        instance_prefix(instance_name),
        blob_part(digest, compressor)
    )
}

fn instance_prefix(instance_name: &str) -> String {
    if instance_name.is_empty() {
        String::new()
    } else {
        format!("{instance_name}/")
    }
}

fn blob_part(digest: &Digest, compressor: Compressor) -> String {
    let function = match digest.function {
        // SHA-256 is implied; leaving it out keeps old clients' form.
        Function::Sha256 => String::new(),
        f => format!("{f}/"),
    };
    match compressor {
        Compressor::Identity => format!("blobs/{function}{digest}"),
        c => format!("compressed-blobs/{}/{function}{digest}", c.name()),
    }
}

fn segments(name: &str) -> Result<Vec<&str>, Error> {
    if name.len() > MAX_NAME_LEN {
        return Err(malformed(name, "longer than 4096 bytes"));
    }
    let segs: Vec<&str> = name.split('/').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(malformed(name, "empty path segment"));
    }
    Ok(segs)
}

fn split_instance<'a>(name: &str, segs: &'a [&'a str]) -> Result<(String, &'a [&'a str]), Error> {
    let at = segs
        .iter()
        .position(|s| matches!(*s, "blobs" | "uploads" | "compressed-blobs"))
        .ok_or_else(|| malformed(name, "no blobs/, compressed-blobs/ or uploads/ segment"))?;
    if segs[..at].iter().any(|s| *s == "." || *s == "..") {
        return Err(malformed(name, "instance name has . or .. segments"));
    }
    Ok((segs[..at].join("/"), &segs[at..]))
}

/// Parses `blobs/[FUNCTION/]HASH/SIZE` or the compressed form; returns the
/// segments left after SIZE.
fn parse_blob_part<'a>(
    name: &str,
    segs: &'a [&'a str],
) -> Result<(Compressor, Digest, &'a [&'a str]), Error> {
    let (compressor, rest) = match segs {
        ["blobs", rest @ ..] => (Compressor::Identity, rest),
        ["compressed-blobs", "zstd", rest @ ..] => (Compressor::Zstd, rest),
        ["compressed-blobs", other, ..] => {
            return Err(Error::UnsupportedCompressor {
                name: name.to_owned(),
                compressor: (*other).to_owned(),
            });
        }
        _ => return Err(malformed(name, "expected blobs/ or compressed-blobs/")),
    };
    let digest_err = |source| Error::Digest {
        name: name.to_owned(),
        source,
    };
    let (function, rest) = match rest.first() {
        Some(first) => match Function::from_name(first).map_err(digest_err)? {
            Some(f) => (f, &rest[1..]),
            None => (Function::Sha256, rest),
        },
        None => return Err(malformed(name, "missing HASH/SIZE")),
    };
    let [hash, size, trailing @ ..] = rest else {
        return Err(malformed(name, "missing HASH/SIZE"));
    };
    let digest = Digest::parse(hash, size, function).map_err(digest_err)?;
    Ok((compressor, digest, trailing))
}

fn malformed(name: &str, why: &'static str) -> Error {
    Error::Malformed {
        name: name.chars().take(300).collect(),
        why,
    }
}

impl fmt::Display for ReadResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&read_name(
            &self.instance_name,
            &self.digest,
            self.compressor,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn reads() {
        let r = parse_read(&format!("blobs/{H}/0")).expect("plain");
        assert_eq!(r.instance_name, "");
        assert_eq!(r.digest.function, Function::Sha256);
        assert_eq!(r.compressor, Compressor::Identity);

        let r = parse_read(&format!("a/b/compressed-blobs/zstd/blake3/{H}/12")).expect("zstd");
        assert_eq!(r.instance_name, "a/b");
        assert_eq!(r.digest.function, Function::Blake3);
        assert_eq!(r.digest.size, 12);
        assert_eq!(r.compressor, Compressor::Zstd);
        assert_eq!(
            read_name("a/b", &r.digest, r.compressor),
            format!("a/b/compressed-blobs/zstd/blake3/{H}/12")
        );
    }

    #[test]
    fn writes() {
        let w = parse_write(&format!("main/uploads/5f1e-aa/blobs/{H}/7/some/meta")).expect("write");
        assert_eq!(w.instance_name, "main");
        assert_eq!(w.upload_id, "5f1e-aa");
        assert_eq!(w.digest.size, 7);
        assert_eq!(
            parse_write(&write_name("", "u1", &w.digest, Compressor::Zstd))
                .expect("roundtrip")
                .compressor,
            Compressor::Zstd
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            String::new(),
            format!("blobs/{H}"),
            format!("blobs/{H}/0/extra"),
            format!("blobs/{H}/-1"),
            format!("blobs/{}/0", &H[..10]),
            format!("//blobs/{H}/0"),
            format!("x/../blobs/{H}/0"),
            format!("compressed-blobs/gzip/{H}/0"),
            format!("blobs/sha1/{H}/0"),
            format!("uploads/u/blobs/{H}/0"),
            "nothing/here".to_owned(),
        ] {
            assert!(parse_read(&bad).is_err(), "read accepted {bad:?}");
        }
        for bad in [
            format!("blobs/{H}/0"),
            format!("uploads/blobs/{H}/0"),
            format!("uploads/u!d/blobs/{H}/0"),
            format!("uploads/u/blobs/{H}"),
        ] {
            assert!(parse_write(&bad).is_err(), "write accepted {bad:?}");
        }
    }
}
