//! Values written as text in the file: durations, sizes, `~` paths.

use std::path::PathBuf;
use std::time::Duration;

use super::EnvLookup;

pub(super) fn expand_tilde(spec: &str, env: EnvLookup) -> Result<PathBuf, String> {
    if spec == "~" || spec.starts_with("~/") {
        let home = env("HOME")
            .filter(|h| !h.is_empty())
            .ok_or("`~` used but HOME is not set")?;
        return Ok(PathBuf::from(format!("{home}{}", &spec[1..])));
    }
    Ok(PathBuf::from(spec))
}

/// Parses "90s", "5m", "1h30m", "250ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"30s\", \"5m\" or \"1h\": {e}"))
}

/// Parses "32MiB", "512KiB", "10MB", "1048576".
pub fn parse_size(s: &str) -> Result<usize, String> {
    let bad =
        || format!("{s:?} is not a size like \"32MiB\", \"512KiB\", \"10MB\" or a number of bytes");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5x").is_err());
    }
}
