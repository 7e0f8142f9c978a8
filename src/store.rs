//! Where credentials live. The token lifecycle talks to a [`CredentialStore`] (load,
//! save) and never to the file system directly; [`FileStore`] is the first
//! implementation. A networked store (Redis) for replicas on many machines would sit
//! behind the same trait with the same guarantees.
//!
//! Store methods block (file I/O); callers run them on the blocking pool. Guarantees of
//! `FileStore::save`: the file is replaced atomically (temp file in the same directory,
//! fsync, rename, fsync of the directory), so a crash leaves the old or the new file and
//! never a truncated one; every field the file had survives; the mode is 0600 or
//! stricter; symlinks are followed so the file they point at is replaced.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::clock;
use crate::credential::{self, CredentialFile, ParseError, TokenUpdate};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: ParseError,
    },
}

/// What a store holds for one credential.
pub trait CredentialStore: Send + Sync + 'static {
    /// Where it lives, for logs and the admin API (a path, never a secret).
    fn location(&self) -> String;
    /// Reads the credential as it is now.
    fn load(&self) -> Result<CredentialFile, StoreError>;
    /// Stores a refreshed token in the credential's own shape. `Ok(false)` when the
    /// stored shape has nothing to update.
    fn save(&self, update: &TokenUpdate) -> Result<bool, StoreError>;
    /// Whether `save` can succeed (a read-only Kubernetes Secret mount cannot).
    fn writable(&self) -> bool;
}

/// A credential JSON file on disk.
pub struct FileStore {
    path: PathBuf,
    /// The last document read successfully: the base for a write-back if the file on
    /// disk has meanwhile become unreadable, so no field is ever lost.
    last_doc: Mutex<Option<Map<String, Value>>>,
}

impl FileStore {
    pub fn new(path: PathBuf) -> Self {
        FileStore {
            path,
            last_doc: Mutex::new(None),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: self.path.display().to_string(),
            op,
            source,
        }
    }

    fn read_doc(&self, path: &Path) -> Result<(CredentialFile, Map<String, Value>), StoreError> {
        let bytes = fs::read(path).map_err(self.io("read"))?;
        let mtime_ms = fs::metadata(path)
            .ok()
            .and_then(|m| m.modified().ok())
            .map(clock::system_time_ms)
            .unwrap_or_else(clock::now_ms);
        credential::parse(&bytes, mtime_ms).map_err(|source| StoreError::Parse {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn remember(&self, doc: &Map<String, Value>) {
        if let Ok(mut last) = self.last_doc.lock() {
            *last = Some(doc.clone());
        }
    }
}

impl CredentialStore for FileStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> Result<CredentialFile, StoreError> {
        let (file, doc) = self.read_doc(&self.path)?;
        self.remember(&doc);
        Ok(file)
    }

    fn save(&self, update: &TokenUpdate) -> Result<bool, StoreError> {
        // Replace the file a symlink points at, not the symlink.
        let target = fs::canonicalize(&self.path).map_err(self.io("resolve"))?;
        let meta = fs::metadata(&target).map_err(self.io("stat"))?;
        let mut doc = match self.read_doc(&target) {
            Ok((_, doc)) => doc,
            Err(e) => {
                let last = self.last_doc.lock().ok().and_then(|l| l.clone());
                match last {
                    Some(doc) => {
                        tracing::warn!(target: "tokenrelay::credentials", path = %self.path.display(), error = %e,
                            "credential file no longer parses; writing back from the last good copy");
                        doc
                    }
                    None => return Err(e),
                }
            }
        };
        if !credential::apply_update(&mut doc, update, clock::now_ms()) {
            return Ok(false);
        }
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|e| StoreError::Io {
            path: self.path.display().to_string(),
            op: "serialize",
            source: e.into(),
        })?;
        bytes.push(b'\n');
        let mode = meta.permissions().mode() & 0o600;
        write_atomically(&target, &bytes, mode, Some((meta.uid(), meta.gid())))
            .map_err(self.io("write back"))?;
        self.remember(&doc);
        Ok(true)
    }

    fn writable(&self) -> bool {
        let target = fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let dir = target.parent().unwrap_or(Path::new("."));
        is_writable_dir(dir)
    }
}

fn is_writable_dir(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Replaces `target` with `bytes`: a temp file in the same directory created exclusively
/// with `mode`, written and fsynced, renamed over the target, then the directory fsynced.
/// On any error the temp file is removed and the target is untouched.
pub fn write_atomically(
    target: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; never widened, so set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            // Keep the owner when running as root for another user; harmless failure otherwise.
            let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, target)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
