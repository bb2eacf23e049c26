//! A file under `tmp/` that removes itself unless it was moved into place.

use std::path::{Path, PathBuf};

use crate::storage::Error;

pub struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    /// Creates a new, empty file with a random name in `dir`.
    pub fn create(dir: &Path) -> Result<(TempFile, std::fs::File), Error> {
        let name = format!("upload-{:032x}", rand::random::<u128>());
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok((TempFile { path: Some(path) }, file))
    }

    /// Renames the file to `dest` (same filesystem), replacing what is there.
    pub fn persist(mut self, dest: &Path) -> Result<(), Error> {
        let path = self
            .path
            .take()
            .expect("a TempFile is persisted at most once");
        std::fs::rename(&path, dest).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            Error::io(format!("moving a blob to {}", dest.display()), e)
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
