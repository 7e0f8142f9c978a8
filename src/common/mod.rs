//! Small pieces several subsystems use and none owns: comparing secrets, an error's causes in one line, reading a
//! server's "try again later" and keep-alive hints, a credential's reported state (`state`: what the
//! lifecycle produces and metrics, the admin API and the proxy read). Depends on nothing
//! else in the crate.

pub mod keep_alive;
pub mod retry_after;
pub mod state;

/// Compares without an early exit on the first differing byte (client keys, the admin
/// token, OAuth `state`).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The causes of an error, innermost last, without the URL (it may be long; it is not
/// secret, but the message reads better without it).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.last().is_some_and(|p: &String| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}
