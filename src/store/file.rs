//! `FileStore`: a credential JSON file on disk, the Qwen-compatible lock file beside it,
//! and the `state_dir` copy for read-only sources.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::shape::{self as credential, CredentialFile, TokenUpdate};
use super::{CredentialStore, StoreError, TryLock};
use crate::clock;

/// A lock older than this is abandoned (its holder died).
pub const LOCK_STALE_AFTER: Duration = Duration::from_secs(30);
/// The state copy's record of which source it was derived from.
const SOURCE_FINGERPRINT: &str = "tokenrelay_source_fingerprint";

/// A credential JSON file on disk, with an optional writable state copy.
pub struct FileStore {
    path: PathBuf,
    state: Option<PathBuf>,
    /// The last document read or written: the base for a write-back if the file on disk
    /// has meanwhile become unreadable, so no field is ever lost.
    last_doc: Mutex<Option<Map<String, Value>>>,
}

impl FileStore {
    pub fn new(path: PathBuf) -> Self {
        FileStore {
            path,
            state: None,
            last_doc: Mutex::new(None),
        }
    }

    /// Keeps refreshed tokens of a read-only source in `state_file`.
    pub fn with_state(mut self, state_file: PathBuf) -> Self {
        self.state = Some(state_file);
        self
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: self.path.display().to_string(),
            op,
            source,
        }
    }

    fn parse(
        &self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(CredentialFile, Map<String, Value>), StoreError> {
        let mtime_ms = fs::metadata(path)
            .ok()
            .and_then(|m| m.modified().ok())
            .map(clock::system_time_ms)
            .unwrap_or_else(clock::now_ms);
        credential::parse(bytes, mtime_ms).map_err(|source| StoreError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    fn remember(&self, doc: &Map<String, Value>) {
        if let Ok(mut last) = self.last_doc.lock() {
            *last = Some(doc.clone());
        }
    }

    /// The state copy, if there is one and it was derived from the source as it is now.
    fn current_state(&self, source_bytes: &[u8]) -> Option<(CredentialFile, Map<String, Value>)> {
        let state = self.state.as_ref()?;
        let bytes = fs::read(state).ok()?;
        let parsed = self.parse(state, &bytes);
        match parsed {
            Ok((file, doc))
                if doc.get(SOURCE_FINGERPRINT).and_then(Value::as_str)
                    == Some(&fingerprint(source_bytes)) =>
            {
                Some((file, doc))
            }
            Ok(_) => {
                tracing::info!(target: "tokenrelay::credentials", path = %self.path.display(), state = %state.display(),
                    "the credential file changed since tokens were saved in state_dir; the file wins");
                None
            }
            Err(e) => {
                tracing::warn!(target: "tokenrelay::credentials", error = %e, "ignoring an unreadable state copy");
                None
            }
        }
    }

    fn save_state(&self, state: &Path, update: &TokenUpdate) -> Result<bool, StoreError> {
        let source = fs::read(&self.path).map_err(self.io("read"))?;
        let mut doc = match self.current_state(&source) {
            Some((_, doc)) => doc,
            None => self.parse(&self.path, &source)?.1,
        };
        let changed = credential::apply_update(&mut doc, update, clock::now_ms());
        if !changed && fs::metadata(state).is_ok() {
            return Ok(false);
        }
        self.write_state_copy(state, doc, &source)?;
        Ok(true)
    }

    /// Writes `doc` as the state copy of the source as it is now (`source`): tagged with
    /// the source's fingerprint, 0600, in a 0700 directory.
    fn write_state_copy(
        &self,
        state: &Path,
        mut doc: Map<String, Value>,
        source: &[u8],
    ) -> Result<(), StoreError> {
        doc.insert(
            SOURCE_FINGERPRINT.into(),
            Value::String(fingerprint(source)),
        );
        if let Some(dir) = state.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(self.io("create state_dir"))?;
        }
        write_atomically(state, &to_bytes(&doc)?, 0o600, None)
            .map_err(self.io("write the state copy"))?;
        self.remember(&doc);
        Ok(())
    }

    /// Writes a whole new credential document (a fresh sign-in) under the lock file, so it
    /// never races a refresh: atomically, mode 0600, through a symlink to its target; into
    /// the state copy when the file cannot be written. Returns where it was written.
    pub fn replace(&self, doc: &Map<String, Value>, wait: Duration) -> Result<PathBuf, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        let _lock = loop {
            match self.try_lock()? {
                TryLock::Acquired(g) => break Some(g),
                TryLock::Unavailable => break None,
                TryLock::Busy if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                TryLock::Busy => {
                    return Err(StoreError::Io {
                        path: self.location(),
                        op: "take the lock file",
                        source: std::io::Error::other("a refresh holds it; try again in a moment"),
                    })
                }
            }
        };
        let exists = fs::metadata(&self.path).is_ok();
        if !exists || self.writable() {
            let target = self.target();
            if let Some(dir) = target.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(self.io("create the directory"))?;
            }
            let owner = fs::metadata(&target).ok().map(|m| (m.uid(), m.gid()));
            write_atomically(&target, &to_bytes(doc)?, 0o600, owner).map_err(self.io("write"))?;
            self.remember(doc);
            return Ok(target);
        }
        let Some(state) = &self.state else {
            return Err(StoreError::Io {
                path: self.location(),
                op: "write",
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the file is read-only; set [refresh] state_dir, or write elsewhere with --out",
                ),
            });
        };
        let source = fs::read(&self.path).map_err(self.io("read"))?;
        self.write_state_copy(state, doc.clone(), &source)?;
        Ok(state.clone())
    }

    /// The document on disk now (the state copy while it is current), if it parses.
    pub fn document(&self) -> Option<Map<String, Value>> {
        self.load().ok()?;
        self.last_doc.lock().ok()?.clone()
    }

    fn target(&self) -> PathBuf {
        fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone())
    }

    fn lock_path(&self) -> PathBuf {
        let target = self.target();
        let stem = target
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        target.with_file_name(format!("{stem}.lock"))
    }
}

impl super::Shares for FileStore {}

impl CredentialStore for FileStore {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> Result<CredentialFile, StoreError> {
        remove_abandoned_temp_files(&self.target());
        let bytes = fs::read(&self.path).map_err(self.io("read"))?;
        if let Some((file, doc)) = self.current_state(&bytes) {
            self.remember(&doc);
            return Ok(file);
        }
        let (file, doc) = self.parse(&self.path, &bytes)?;
        self.remember(&doc);
        Ok(file)
    }

    fn save(&self, update: &TokenUpdate) -> Result<bool, StoreError> {
        if !self.writable() {
            return match &self.state {
                Some(state) => self.save_state(state, update),
                None => Err(StoreError::Io {
                    path: self.location(),
                    op: "write back",
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the directory is read-only; set [refresh] state_dir to keep refreshed tokens across restarts",
                    ),
                }),
            };
        }
        // Replace the file a symlink points at, not the symlink.
        let target = fs::canonicalize(&self.path).map_err(self.io("resolve"))?;
        let meta = fs::metadata(&target).map_err(self.io("stat"))?;
        let on_disk = fs::read(&target)
            .map_err(self.io("read"))
            .and_then(|b| self.parse(&target, &b));
        let mut doc = match on_disk {
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
        let mode = meta.permissions().mode() & 0o600;
        write_atomically(
            &target,
            &to_bytes(&doc)?,
            mode,
            Some((meta.uid(), meta.gid())),
        )
        .map_err(self.io("write back"))?;
        self.remember(&doc);
        Ok(true)
    }

    fn writable(&self) -> bool {
        let target = self.target();
        is_writable_dir(target.parent().unwrap_or(Path::new(".")))
    }

    fn persistent(&self) -> bool {
        self.writable() || self.state.is_some()
    }

    fn try_lock(&self) -> Result<TryLock, StoreError> {
        let path = self.lock_path();
        if !is_writable_dir(path.parent().unwrap_or(Path::new("."))) {
            return Ok(TryLock::Unavailable);
        }
        match FileLock::try_acquire(&path) {
            Ok(Some(lock)) => Ok(TryLock::Acquired(Box::new(lock))),
            Ok(None) => Ok(TryLock::Busy),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Ok(TryLock::Unavailable)
            }
            Err(source) => Err(StoreError::Io {
                path: path.display().to_string(),
                op: "take the refresh lock",
                source,
            }),
        }
    }
}

/// Temp files of a write-back that was killed between create and rename (they hold a
/// token): removed once they are clearly abandoned, never one a live writer still uses.
fn remove_abandoned_temp_files(target: &Path) {
    let Some(dir) = target.parent() else { return };
    let prefix = format!(".{}.", short_name(target));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name().to_string_lossy().into_owned();
        let ours = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > LOCK_STALE_AFTER);
        if ours && old && fs::remove_file(entry.path()).is_ok() {
            tracing::info!(target: "tokenrelay::credentials", file = %entry.path().display(),
                "removed a temp file left by an interrupted write-back");
        }
    }
}

fn to_bytes(doc: &Map<String, Value>) -> Result<Vec<u8>, StoreError> {
    let mut bytes = serde_json::to_vec_pretty(doc).map_err(|e| StoreError::Io {
        path: String::new(),
        op: "serialize",
        source: e.into(),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// FNV-1a: a stable fingerprint of a source file, to tell whether it changed.
pub(super) fn fingerprint(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}-{}", bytes.len())
}

/// A lock file owned by this process, identified by a random id.
struct FileLock {
    path: PathBuf,
    id: String,
}

impl FileLock {
    fn try_acquire(path: &Path) -> std::io::Result<Option<FileLock>> {
        let id = format!("{:032x}", rand::random::<u128>());
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(id.as_bytes())?;
                Ok(Some(FileLock {
                    path: path.to_path_buf(),
                    id,
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if is_stale(path) {
                    break_stale(path);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Only the owner removes it: if ours was broken as stale, someone else's is there now.
        if fs::read_to_string(&self.path).is_ok_and(|held| held.trim() == self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn is_stale(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > LOCK_STALE_AFTER)
}

/// Removes an abandoned lock without ever removing a live one: the lock is renamed aside
/// (atomic), and deleted only if what was moved is still the stale lock that was seen;
/// otherwise it is put back.
fn break_stale(path: &Path) {
    let Ok(seen) = fs::read(path) else { return };
    let aside = path.with_file_name(format!(
        ".{}.stale.{:016x}",
        short_name(path),
        rand::random::<u64>()
    ));
    if fs::rename(path, &aside).is_err() {
        return; // someone else got there first
    }
    if fs::read(&aside).is_ok_and(|moved| moved == seen) && is_stale(&aside) {
        tracing::warn!(target: "tokenrelay::credentials", lock = %path.display(), "removed a stale refresh lock");
    } else {
        // A live lock was created in between: restore it unless a newer one exists.
        let _ = fs::hard_link(&aside, path);
    }
    let _ = fs::remove_file(&aside);
}

/// The start of a file name, for the names of files made beside it (temp files, stale
/// locks): short enough that they fit NAME_MAX (255 bytes) whatever the original's length.
fn short_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().chars().take(64).collect())
        .unwrap_or_default()
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
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        short_name(target),
        rand::random::<u64>()
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oauth_creds.lock");
        let first = FileLock::try_acquire(&path)
            .unwrap()
            .expect("free lock is taken");
        assert!(
            FileLock::try_acquire(&path).unwrap().is_none(),
            "held lock is busy"
        );
        // Someone broke our lock and took it: dropping ours must not remove theirs.
        fs::write(&path, "someone-else").unwrap();
        drop(first);
        assert_eq!(fs::read_to_string(&path).unwrap(), "someone-else");
    }

    #[test]
    fn stale_lock_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.lock");
        fs::write(&path, "dead-process").unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(
            FileLock::try_acquire(&path).unwrap().is_none(),
            "first attempt breaks it"
        );
        let lock = FileLock::try_acquire(&path)
            .unwrap()
            .expect("then it is free");
        assert_eq!(fs::read_to_string(&path).unwrap(), lock.id);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn long_file_names_can_be_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(format!("{}.json", "c".repeat(245)));
        fs::write(&target, "{}").unwrap();
        write_atomically(&target, b"{\"a\":1}", 0o600, None).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn abandoned_temp_files_are_removed_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("c.json");
        fs::write(&target, r#"{"access_token":"a"}"#).unwrap();
        let old = dir.path().join(".c.json.0123456789abcdef.tmp");
        let fresh = dir.path().join(".c.json.fedcba9876543210.tmp");
        let other = dir.path().join(".other.json.0123456789abcdef.tmp");
        for f in [&old, &fresh, &other] {
            fs::write(f, "{").unwrap();
        }
        let past = SystemTime::now() - Duration::from_secs(120);
        for f in [&old, &other] {
            File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        FileStore::new(target).load().unwrap();
        assert!(!old.exists(), "abandoned temp file removed");
        assert!(fresh.exists(), "a writer may still be using it");
        assert!(other.exists(), "another file's temp is not ours");
    }

    #[test]
    fn fresh_lock_is_not_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.lock");
        fs::write(&path, "alive").unwrap();
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        assert_eq!(fs::read_to_string(&path).unwrap(), "alive");
    }
}
