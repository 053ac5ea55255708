//! Memory the allocator holds free, given back to the system once the engine has caught up.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena for its next allocations,
//! and returns pages to the system only from the top of a heap, past a threshold that grows with
//! the first large frees. A catch-up's transient batches are freed in the middle of the heap, under
//! the state they built: their pages stay resident, and a container's memory limit counts them as
//! if the engine still used them. `malloc_trim` walks every arena and returns the whole free pages
//! in it, wherever they are; live allocations stay where they are.
//!
//! It holds each arena's lock while it walks that arena, and a worker that allocates meanwhile
//! waits: done every few seconds under load, it made the slowest answers several times slower
//! (docs/bench/README.md). So [`GiveBack`] does it once, when the engine has caught up with the
//! input it found at start and the changelog records of the catch-up have gone out, the moment the
//! catch-up's memory is freed; after that the allocator is left to itself (the glibc tunables of
//! docs/operations/README.md make it return memory as it goes).
//!
//! With `--features mimalloc`, or off glibc, there is nothing to ask: those allocators return
//! memory themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the thread asks whether the engine has caught up.
pub const EVERY: Duration = Duration::from_secs(1);

/// How long after catching up the thread waits at most for the catch-up's output to go out: under
/// steady input some is always in flight.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// The process's resident memory, in bytes, as the process metrics read it (0 if `/proc` cannot
/// tell it).
fn resident() -> u64 {
    #[cfg(target_os = "linux")]
    if let Ok(stat) = procfs::process::Process::myself().and_then(|me| me.stat()) {
        return stat.rss * procfs::page_size();
    }
    0
}

/// Asks the allocator to return the free pages it holds to the system; says whether any went.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
#[allow(unsafe_code)]
pub fn give_back() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and changes only glibc's own free lists, each under
    // its arena's lock, as every allocation does; any thread may call it at any time.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Asks the allocator to return the free pages it holds to the system; says whether any went.
#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
pub fn give_back() -> bool {
    false
}

/// A thread that gives free memory back once the engine has caught up, then ends; stopped when
/// dropped.
#[derive(Debug)]
pub struct GiveBack {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GiveBack {
    /// Starts the thread, which asks `caught_up` whether the engine has caught up with its input,
    /// then `settled` whether what the catch-up produced has gone out too (the changelog records it
    /// wrote acknowledged), waiting at most [`SETTLE_LIMIT`] for that (none if the thread cannot
    /// start: the engine runs on, holding more).
    pub fn start(
        caught_up: impl Fn() -> bool + Send + 'static,
        settled: impl Fn() -> bool + Send + 'static,
    ) -> GiveBack {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("give-back".into())
            .spawn(move || {
                let mut next = Instant::now() + EVERY;
                let mut caught_up_at = None;
                while !flag.load(Ordering::Acquire) {
                    // Short naps: a stop does not wait for the period.
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() < next {
                        continue;
                    }
                    next = Instant::now() + EVERY;
                    let Some(at) = caught_up_at.or_else(|| caught_up().then(Instant::now)) else {
                        continue;
                    };
                    caught_up_at = Some(at);
                    if !settled() && at.elapsed() < SETTLE_LIMIT {
                        continue;
                    }
                    let (before, began) = (resident(), Instant::now());
                    give_back();
                    tracing::info!(
                        "caught up: free memory given back in {:?}, RSS {before} -> {} bytes",
                        began.elapsed(),
                        resident()
                    );
                    return;
                }
            })
            .map_err(|e| tracing::warn!("free memory is not given back: {e}"))
            .ok();
        GiveBack { stop, thread }
    }
}

impl Drop for GiveBack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
