//! Counting a Server-Sent Events stream's events as its bytes come, without parsing them: what
//! clients that only need to keep up (the many-clients tests and benchmarks) do with a feed.
//! (A file of its own so that the benchmark can include it too.)

/// Counts `event: ` lines across reads of any size.
#[derive(Debug, Default)]
pub struct EventCounter {
    /// The end of the last read, for an `event: ` split between two reads.
    tail: Vec<u8>,
}

impl EventCounter {
    /// The events that `bytes`, the next bytes read, complete.
    pub fn count(&mut self, bytes: &[u8]) -> u64 {
        const MARK: &[u8] = b"event: ";
        self.tail.extend_from_slice(bytes);
        let found = self.tail.windows(MARK.len()).filter(|w| *w == MARK).count();
        let keep = self.tail.len().saturating_sub(MARK.len() - 1);
        self.tail.drain(..keep);
        found as u64
    }
}
