//! Where things live under the data directory, and how digests become
//! database keys and file names.
//!
//! ```text
//! DATA_DIR/FORMAT                      "outpost-data-format N"
//! DATA_DIR/index.redb                  blob index, LRU order, Action Cache
//! DATA_DIR/cas/FUNCTION/XX/HASH-SIZE   blob bytes (XX = first two hex digits)
//! DATA_DIR/tmp/XX/                     uploads in progress; emptied at start-up
//! ```

use std::path::{Path, PathBuf};

use outpost_proto::digest::{Digest, Function};

use crate::storage::Error;

/// Bumped whenever the on-disk layout or database schema changes.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_FILE: &str = "FORMAT";
const FORMAT_PREFIX: &str = "outpost-data-format ";

pub const KEY_LEN: usize = 1 + Function::HASH_LEN + 8;
pub type Key = [u8; KEY_LEN];

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn db(&self) -> PathBuf {
        self.root.join("index.redb")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where an upload of `d` is written before it is verified: spread over
    /// 256 directories like the blobs, so concurrent uploads do not all
    /// contend for one directory's lock.
    pub fn tmp_for(&self, d: &Digest) -> PathBuf {
        self.tmp().join(hex::encode([d.hash[0]]))
    }

    pub fn cas(&self) -> PathBuf {
        self.root.join("cas")
    }

    pub fn blob(&self, d: &Digest) -> PathBuf {
        let hash = d.hash_hex();
        self.cas()
            .join(d.function.name())
            .join(&hash[..2])
            .join(format!("{hash}-{}", d.size))
    }

    /// Creates the directory tree, or checks an existing one is ours and of
    /// a format this build reads.
    pub fn prepare(&self) -> Result<(), Error> {
        let format_path = self.root.join(FORMAT_FILE);
        match std::fs::read_to_string(&format_path) {
            Ok(text) => check_format(&format_path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let nonempty = std::fs::read_dir(&self.root)
                    .map(|mut entries| entries.next().is_some())
                    .unwrap_or(false);
                if nonempty {
                    return Err(Error::Io {
                        context: format!(
                            "opening {}: the directory is not empty and has no {FORMAT_FILE} file, \
                             so it is not an outpost data directory; point --data-dir at a new or \
                             empty directory",
                            self.root.display()
                        ),
                        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                    });
                }
                std::fs::create_dir_all(&self.root)
                    .map_err(|e| Error::io(format!("creating {}", self.root.display()), e))?;
                write_durably(&format_path, &format!("{FORMAT_PREFIX}{FORMAT_VERSION}\n"))?;
            }
            Err(e) => return Err(Error::io(format!("reading {}", format_path.display()), e)),
        }
        for function in outpost_proto::digest::SUPPORTED {
            for byte in 0..=255u8 {
                let dir = self.cas().join(function.name()).join(hex::encode([byte]));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
        }
        let tmp = self.tmp();
        if tmp.exists() {
            // Uploads that were in flight when the process stopped.
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| Error::io(format!("clearing {}", tmp.display()), e))?;
        }
        for byte in 0..=255u8 {
            let dir = tmp.join(hex::encode([byte]));
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        Ok(())
    }
}

fn check_format(path: &Path, text: &str) -> Result<(), Error> {
    let version = text
        .trim()
        .strip_prefix(FORMAT_PREFIX)
        .and_then(|v| v.parse::<u32>().ok());
    match version {
        Some(FORMAT_VERSION) => Ok(()),
        other => Err(Error::Io {
            context: format!(
                "{} says {:?}: this outpost reads data format {FORMAT_VERSION} only; run the \
                 outpost version that wrote it, or start with a new --data-dir",
                path.display(),
                other.map_or_else(|| text.trim().to_owned(), |v| format!("format {v}")),
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        }),
    }
}

fn write_durably(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    let ctx = || format!("writing {}", path.display());
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(ctx(), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(ctx(), e))?;
    f.sync_all().map_err(|e| Error::io(ctx(), e))
}

pub fn key(d: &Digest) -> Key {
    let mut k = [0u8; KEY_LEN];
    k[0] = d.function.to_proto() as u8;
    k[1..1 + Function::HASH_LEN].copy_from_slice(&d.hash);
    k[1 + Function::HASH_LEN..].copy_from_slice(&d.size.to_be_bytes());
    k
}

pub fn digest_of_key(k: &Key) -> Option<Digest> {
    let function = Function::from_proto(i32::from(k[0])).ok()?;
    let mut hash = [0u8; Function::HASH_LEN];
    hash.copy_from_slice(&k[1..1 + Function::HASH_LEN]);
    let mut size = [0u8; 8];
    size.copy_from_slice(&k[1 + Function::HASH_LEN..]);
    Some(Digest {
        function,
        hash,
        size: u64::from_be_bytes(size),
    })
}

/// Parses a blob file name back into its digest (for the orphan sweep).
pub fn digest_of_file(function: Function, name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    Digest::parse(hash, size, function).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip() {
        let d = Function::Blake3.digest_of(b"abc");
        assert_eq!(digest_of_key(&key(&d)), Some(d));
        let layout = Layout {
            root: PathBuf::from("/data"),
        };
        let path = layout.blob(&d);
        let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8");
        assert_eq!(digest_of_file(Function::Blake3, name), Some(d));
        assert!(path.starts_with("/data/cas/blake3/"));
    }

    #[test]
    fn refuses_foreign_or_future_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("something"), "x").expect("write");
        let layout = Layout {
            root: dir.path().to_owned(),
        };
        assert!(layout.prepare().is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FORMAT_FILE), "outpost-data-format 99\n").expect("write");
        let err = Layout {
            root: dir.path().to_owned(),
        }
        .prepare()
        .expect_err("future format");
        assert!(err.to_string().contains("format 99"), "{err}");

        let fresh = dir.path().join("fresh");
        let layout = Layout { root: fresh };
        layout.prepare().expect("new directory");
        layout.prepare().expect("reopen");
    }
}
