//! Usage history on one machine: an SQLite file (WAL, written by the ledger's task through
//! the blocking pool, never by a request). One table: a row per bucket (`span` 60 or 3600
//! seconds), client, provider, model and credential, its sums added by upsert. Minute rows
//! are pruned after 48 hours, hour rows after 400 days.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};

use super::usage::{Key, Spent, Stored, Sums, KEEP_HOURS_S, KEEP_MINUTES_S};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    span INTEGER NOT NULL,
    start INTEGER NOT NULL,
    client TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    credential TEXT NOT NULL,
    answers INTEGER NOT NULL,
    unknown INTEGER NOT NULL,
    prompt INTEGER NOT NULL,
    completion INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    thoughts INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (span, start, client, provider, model, credential)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

const UPSERT: &str = "
INSERT INTO usage (span, start, client, provider, model, credential,
                   answers, unknown, prompt, completion, cached, thoughts, tokens)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
ON CONFLICT (span, start, client, provider, model, credential) DO UPDATE SET
    answers = answers + excluded.answers,
    unknown = unknown + excluded.unknown,
    prompt = prompt + excluded.prompt,
    completion = completion + excluded.completion,
    cached = cached + excluded.cached,
    thoughts = thoughts + excluded.thoughts,
    tokens = tokens + excluded.tokens
";

pub struct UsageDb {
    conn: Mutex<Connection>,
    /// What it is, for messages: the file's path or "memory".
    pub place: String,
}

impl UsageDb {
    /// Opens (creating it, and its directory, when missing) the file, or a database in
    /// memory for `None`.
    pub fn open(path: Option<&Path>) -> Result<UsageDb, String> {
        let (conn, place) = match path {
            None => (Connection::open_in_memory(), "memory".to_string()),
            Some(p) => {
                let place = p.display().to_string();
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("{place}: cannot create its directory: {e}"))?;
                }
                create_private(p).map_err(|e| format!("{place}: cannot create: {e}"))?;
                (Connection::open(p), place)
            }
        };
        let conn = conn.map_err(|e| format!("{place}: cannot open: {e}"))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            if path.is_some() {
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
            }
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version > 1 {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "written by a newer tokenrelay (schema {version})"
                )));
            }
            conn.execute_batch(SCHEMA)
        };
        setup().map_err(|e| {
            format!("{place}: not a usable usage database ({e}); move it aside or set [usage] path")
        })?;
        Ok(UsageDb {
            conn: Mutex::new(conn),
            place,
        })
    }

    pub fn in_memory(&self) -> bool {
        self.place == "memory"
    }

    /// Adds rows to their minute and their hour, in one transaction.
    pub fn add(&self, rows: &[(Key, Sums)]) -> Result<(), String> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut write = || -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut up = tx.prepare_cached(UPSERT)?;
                for (k, s) in rows {
                    for (span, start) in [(60, k.minute), (3600, k.minute.div_euclid(3600) * 3600)]
                    {
                        up.execute(params![
                            span,
                            start,
                            &*k.client,
                            &*k.provider,
                            &*k.model,
                            &*k.credential,
                            s.answers as i64,
                            s.unknown as i64,
                            s.prompt as i64,
                            s.completion as i64,
                            s.cached as i64,
                            s.thoughts as i64,
                            s.tokens as i64,
                        ])?;
                    }
                }
            }
            tx.commit()
        };
        write().map_err(|e| format!("{}: cannot write usage: {e}", self.place))
    }

    /// The rows of one resolution whose bucket starts in `[since, until)`.
    pub fn rows(&self, span: i64, since: i64, until: i64) -> Result<Vec<Stored>, String> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let read = || -> rusqlite::Result<Vec<Stored>> {
            let mut q = conn.prepare_cached(
                "SELECT start, client, provider, model, credential,
                        answers, unknown, prompt, completion, cached, thoughts, tokens
                 FROM usage WHERE span = ?1 AND start >= ?2 AND start < ?3",
            )?;
            let rows = q.query_map(params![span, since, until], |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok((
                    r.get::<_, i64>(0)?,
                    Key {
                        minute: r.get(0)?,
                        client: r.get::<_, String>(1)?.into(),
                        provider: r.get::<_, String>(2)?.into(),
                        model: r.get::<_, String>(3)?.into(),
                        credential: r.get::<_, String>(4)?.into(),
                    },
                    Sums {
                        answers: n(5)?,
                        unknown: n(6)?,
                        prompt: n(7)?,
                        completion: n(8)?,
                        cached: n(9)?,
                        thoughts: n(10)?,
                        tokens: n(11)?,
                    },
                ))
            })?;
            rows.collect()
        };
        read().map_err(|e| format!("{}: cannot read usage: {e}", self.place))
    }

    /// What each client spent in the windows `now_ms` is in: this minute (tokens and
    /// answers), today and this month (UTC).
    pub fn spent(&self, now_ms: i64) -> Result<Vec<(String, Spent)>, String> {
        let now_s = now_ms.div_euclid(1000);
        let minute = now_s.div_euclid(60) * 60;
        let day = now_s.div_euclid(86_400) * 86_400;
        let month = crate::clock::month_start_ms(now_ms) / 1000;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let read = || -> rusqlite::Result<Vec<(String, Spent)>> {
            let mut q = conn.prepare_cached(
                "SELECT client,
                    SUM(CASE WHEN span = 60 AND start = ?1 THEN tokens ELSE 0 END),
                    SUM(CASE WHEN span = 60 AND start = ?1 THEN answers ELSE 0 END),
                    SUM(CASE WHEN span = 3600 AND start >= ?2 THEN tokens ELSE 0 END),
                    SUM(CASE WHEN span = 3600 THEN tokens ELSE 0 END)
                 FROM usage
                 WHERE client != '-' AND ((span = 60 AND start = ?1) OR (span = 3600 AND start >= ?3))
                 GROUP BY client",
            )?;
            let rows = q.query_map(params![minute, day, month.min(day)], |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok((
                    r.get::<_, String>(0)?,
                    Spent {
                        tokens_in_minute: n(1)?,
                        requests_in_minute: n(2)?,
                        tokens_in_day: n(3)?,
                        tokens_in_month: n(4)?,
                    },
                ))
            })?;
            rows.collect()
        };
        read().map_err(|e| format!("{}: cannot read usage: {e}", self.place))
    }

    /// Removes minute rows older than 48 hours and hour rows older than 400 days.
    pub fn prune(&self, now_s: i64) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let done = conn.execute(
            "DELETE FROM usage WHERE (span = 60 AND start < ?1) OR (span = 3600 AND start < ?2)",
            params![now_s - KEEP_MINUTES_S, now_s - KEEP_HOURS_S],
        );
        if let Err(e) = done {
            tracing::warn!(target: "tokenrelay::usage", place = %self.place, error = %e, "cannot prune old usage rows");
        }
    }
}

/// Creates the file 0600 when it does not exist (usage names clients and credentials).
fn create_private(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(minute: i64, client: &str) -> Key {
        Key {
            minute,
            client: client.into(),
            provider: "gemini".into(),
            model: "gemini-2.5-flash".into(),
            credential: "a".into(),
        }
    }

    fn sums(tokens: u64) -> Sums {
        Sums {
            answers: 1,
            prompt: tokens,
            tokens,
            ..Sums::default()
        }
    }

    #[test]
    fn rows_add_up_in_minutes_and_hours_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/usage.db");
        let t0 = 1_796_000_000 / 3600 * 3600; // an hour's start
        {
            let db = UsageDb::open(Some(&path)).unwrap();
            db.add(&[(key(t0, "bot"), sums(10)), (key(t0 + 60, "bot"), sums(5))])
                .unwrap();
            db.add(&[(key(t0, "bot"), sums(1))]).unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let db = UsageDb::open(Some(&path)).unwrap();
        let minutes = db.rows(60, t0, t0 + 3600).unwrap();
        assert_eq!(minutes.len(), 2);
        let first = minutes.iter().find(|r| r.0 == t0).unwrap();
        assert_eq!((first.2.answers, first.2.tokens), (2, 11));
        let hours = db.rows(3600, t0, t0 + 3600).unwrap();
        assert_eq!(hours.len(), 1);
        assert_eq!((hours[0].2.answers, hours[0].2.tokens), (3, 16));
        let spent = db.spent((t0 + 60) * 1000 + 5).unwrap();
        assert_eq!(spent.len(), 1);
        assert_eq!(spent[0].1.tokens_in_minute, 5);
        assert_eq!(spent[0].1.tokens_in_day, 16);
        db.prune(t0 + KEEP_MINUTES_S + 30);
        assert_eq!(
            db.rows(60, t0, t0 + 3600).unwrap().len(),
            1,
            "the first minute pruned"
        );
        assert_eq!(db.rows(3600, t0, t0 + 3600).unwrap().len(), 1, "hours kept");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        std::fs::write(&path, b"not sqlite at all, but long enough to be read as a header....................................................").unwrap();
        let e = UsageDb::open(Some(&path)).err().unwrap();
        assert!(e.contains("usage.db") && e.contains("[usage] path"), "{e}");
        assert!(
            std::fs::read(&path).unwrap().starts_with(b"not sqlite"),
            "left as it was"
        );
    }
}
