//! The usage scanner reads every answer's untrusted bytes on the request path. It must
//! never panic, and it must find the same usage however the answer is cut into chunks:
//! the first two bytes choose the cuts, the rest is the answer. Read as one usage object,
//! the typed (fast) reading must agree with the `Value` reading wherever it decides.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenrelay::usage::scan::{typed_agrees, usage_of, Scanner};

fuzz_target!(|data: &[u8]| {
    assert!(typed_agrees(data), "typed and Value readings differ");
    let (cuts, answer) = data.split_at(data.len().min(2));
    let whole = usage_of(answer);
    // Pieces of a size the input chooses (1 to 64 bytes), and a cut at a chosen byte.
    let size = usize::from(cuts.first().copied().unwrap_or(1) % 64) + 1;
    let mut s = Scanner::default();
    for piece in answer.chunks(size) {
        s.feed(piece);
    }
    assert_eq!(s.last(), whole, "pieces of {size}");
    let at = usize::from(cuts.get(1).copied().unwrap_or(0)) * answer.len() / 256;
    let mut s = Scanner::default();
    s.feed(&answer[..at]);
    s.feed(&answer[at..]);
    assert_eq!(s.last(), whole, "cut at {at}");
});
