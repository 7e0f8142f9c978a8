//! The log writer: a line is appended to a shared buffer, and a thread of its own writes
//! the buffer to stderr in batches (every few milliseconds while lines arrive). A request's
//! log line costs a copy instead of a locked `write(2)`; lines keep their order and are
//! never dropped — past `MAX_PENDING` unwritten bytes, loggers wait for the writer.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather before one write.
const BATCH: Duration = Duration::from_millis(2);
/// Unwritten bytes past which a logger waits (a stalled stderr must not eat memory).
const MAX_PENDING: usize = 4 << 20;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Lines arrived (or closing).
    ready: Condvar,
    /// The writer took the buffer: loggers over the limit may go on.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What `tracing_subscriber` writes through (`MakeWriter`).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes out what is still pending, then stops the writer thread (on drop).
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread on `out` (stderr in production).
pub fn start(mut out: impl Write + Send + 'static) -> io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared::default());
    let me = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("tokenrelay-log".into())
        .spawn(move || {
            let mut spare = Vec::new();
            loop {
                let mut p = me.lock();
                while p.bytes.is_empty() && !p.closed {
                    p = me.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                if p.bytes.is_empty() {
                    return;
                }
                let closing = p.closed;
                drop(p);
                if !closing {
                    std::thread::sleep(BATCH);
                }
                std::mem::swap(&mut me.lock().bytes, &mut spare);
                me.room.notify_all();
                // Nowhere to report a failed write to: the next batch tries again.
                let _ = out.write_all(&spare).and_then(|()| out.flush());
                spare.clear();
            }
        })?;
    Ok((
        LogWriter {
            shared: Arc::clone(&shared),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut p = self.shared.lock();
        while p.bytes.len() > MAX_PENDING && !p.closed {
            p = self.shared.room.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend_from_slice(line);
        drop(p);
        if was_empty {
            self.shared.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_in_order_before_the_guard_returns() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        w.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = out
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "thread {t} in order");
        }
    }
}
