//! Memory the allocator holds free, given back to the system.
//!
//! glibc's allocator keeps what a thread frees in that thread's arena for its next allocations,
//! and returns pages to the system only from the top of a heap, past a threshold that grows with
//! the first large frees. A catch-up's transient batches, and each checkpoint's copy of the state,
//! are freed in the middle of the heap under live state: their pages stay resident, and a
//! container's memory limit counts them as if the engine still used them. `malloc_trim` walks every
//! arena and returns the whole free pages in it, wherever they are; live allocations stay where they
//! are. It holds each arena's lock while it walks that arena, so it runs on a thread of its own, not
//! on a worker, and seldom: [`GiveBack`] runs it every [`EVERY`].
//!
//! With `--features mimalloc`, or off glibc, there is nothing to ask: those allocators return
//! memory themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often free memory is given back: often enough that a catch-up's or a checkpoint's transient
/// memory does not stay for long, seldom enough that the walk and the page faults of memory used
/// again are a small share of the time (measured in docs/bench/README.md).
pub const EVERY: Duration = Duration::from_secs(5);

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

/// A thread that gives free memory back every [`EVERY`], until dropped.
#[derive(Debug)]
pub struct GiveBack {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GiveBack {
    /// Starts the thread (none if the thread cannot start: the engine runs on, holding more).
    pub fn start() -> GiveBack {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("give-back".into())
            .spawn(move || {
                let mut next = Instant::now() + EVERY;
                while !flag.load(Ordering::Acquire) {
                    // Short naps: a stop does not wait for the period.
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() < next {
                        continue;
                    }
                    let began = Instant::now();
                    let gave = give_back();
                    tracing::debug!("free memory given back ({gave}) in {:?}", began.elapsed());
                    next = Instant::now() + EVERY;
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
