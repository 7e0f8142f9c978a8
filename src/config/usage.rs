//! `[usage]`: where usage history and client budgets are kept on one machine (an SQLite
//! file). In fleet mode they are kept in Redis instead, and this section is not used.

use std::path::{Path, PathBuf};

use super::raw::RawUsage;
use super::values::expand_tilde;
use super::{ConfigError, RefreshConfig, Validator};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// The SQLite file; `None` keeps usage in memory only (`path = ":memory:"`).
    pub path: Option<PathBuf>,
    /// Whether `path` was written in the file: a file that cannot be opened is then an
    /// error at start-up; a defaulted one that cannot be opened falls back to memory.
    pub explicit: bool,
}

impl Validator<'_> {
    pub(super) fn usage(
        &self,
        raw: RawUsage,
        refresh: &RefreshConfig,
    ) -> Result<UsageConfig, ConfigError> {
        match raw.path.as_deref().map(str::trim) {
            Some(":memory:") => Ok(UsageConfig {
                path: None,
                explicit: true,
            }),
            Some("") => Err(self.err(
                "usage.path",
                "is empty: name an SQLite file (it is created), or \":memory:\" to keep usage in memory only",
            )),
            Some(p) => Ok(UsageConfig {
                path: Some(expand_tilde(p, self.env).map_err(|e| self.err("usage.path", e))?),
                explicit: true,
            }),
            // `usage.db` in `refresh.state_dir`, else beside this file.
            None => Ok(UsageConfig {
                path: Some(match &refresh.state_dir {
                    Some(dir) => dir.join("usage.db"),
                    None => beside(self.file).join("usage.db"),
                }),
                explicit: false,
            }),
        }
    }
}

/// The directory of the configuration file (the working directory for built-in defaults).
fn beside(file: &str) -> PathBuf {
    match Path::new(file).parent() {
        Some(dir) if !dir.as_os_str().is_empty() && Path::new(file).is_file() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
