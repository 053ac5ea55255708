//! Thread priorities: the workers and the checkpoint writer run below the threads that answer.

/// How much lower than the rest of the process the workers (and the checkpoint writer) run, as a
/// nice value (measured in docs/bench/README.md, Performance: lower went no better for queries
/// and let the input lag).
const WORKER_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`WORKER_NICE`]: for the workers and the
/// checkpoint writer. When every core is busy, the HTTP threads, the view thread and the Kafka
/// clients then go first and the workers take the rest: an answer waits less for a core, while the
/// workers, which take larger batches when they fall behind, catch up in their next step.
pub(crate) fn yield_to_queries() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let result = rustix::process::getpriority_process(Some(tid)).and_then(|nice| {
            rustix::process::setpriority_process(Some(tid), (nice + WORKER_NICE).min(19))
        });
        if let Err(e) = result {
            tracing::debug!("worker priority unchanged: {e}");
        }
    }
}
