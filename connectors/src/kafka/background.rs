//! [`Background`]: a named thread with a stop flag, for the client threads that run beside the
//! workers (the topic watch, the backup view).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::KafkaError;

/// A background thread's stop flag and handle. The thread's body checks [`Background::stopping`]
/// and parks between rounds; [`Background::stop`] wakes it and waits for it.
#[derive(Debug, Default)]
pub struct Background {
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Background {
    /// Runs `body` on a new thread named `name`.
    pub fn start(
        &self,
        name: &str,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), KafkaError> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(body)
            .map_err(|e| KafkaError::Thread {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Whether the thread has been asked to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks the thread to stop without waiting; returns whether it had been asked already.
    pub fn request_stop(&self) -> bool {
        self.stop.swap(true, Ordering::AcqRel)
    }

    /// Asks the thread to stop, wakes it and waits for it.
    pub fn stop(&self) {
        self.request_stop();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}
