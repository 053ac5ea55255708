//! Many HTTP clients of one kind, for the engine's CPU with them connected: feed clients that
//! read a push feed as it comes, or pollers that ask for the whole answer once a period, as a
//! dashboard does. All of them run on one thread (a current-thread tokio runtime), so the
//! clients' own cost stays small beside the engine's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the clients are.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Each reads `GET path` as a Server-Sent Events stream.
    Feed,
    /// Each sends `GET path` on its keep-alive connection once per period.
    Poll(Duration),
}

/// Clients running until dropped.
pub struct Crowd {
    stop: Arc<AtomicBool>,
    /// Feed events or poll answers received, over all clients.
    pub received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Crowd {
    /// Connects `clients` clients of `kind` to `path` on `addr`; returns once every one has sent
    /// its first request.
    pub fn start(addr: std::net::SocketAddr, path: &str, clients: usize, kind: Kind) -> Crowd {
        let (stop, received) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (flag, count) = (stop.clone(), received.clone());
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a client runtime");
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for c in 0..clients {
                    let mut stream = TcpStream::connect(addr).await.expect("connects");
                    stream.write_all(request.as_bytes()).await.expect("asks");
                    let (flag, count, request) = (flag.clone(), count.clone(), request.clone());
                    // Pollers spread over the period, as independent dashboards would be.
                    let phase = c as f64 / clients as f64;
                    tasks.push(tokio::spawn(async move {
                        let _ = match kind {
                            Kind::Feed => feed(stream, &flag, &count).await,
                            Kind::Poll(every) => {
                                poll(stream, &request, every, phase, &flag, &count).await
                            }
                        };
                    }));
                }
                let _ = opened_tx.send(());
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        opened_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every client connected");
        Crowd {
            stop,
            received,
            thread: Some(thread),
        }
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A feed client waits for its next event (a keep-alive comment at most 15 s away) before
        // it sees the flag; the thread is left to end by itself.
        drop(self.thread.take());
    }
}

/// Reads the stream, counting `event: ` lines.
async fn feed(mut stream: TcpStream, stop: &AtomicBool, count: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = crate::event_count::EventCounter::default();
    while !stop.load(Ordering::Relaxed) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        count.fetch_add(events.count(&buf[..n]), Ordering::Relaxed);
    }
    Ok(())
}

/// Reads an answer, then asks again at the next period.
async fn poll(
    mut stream: TcpStream,
    request: &str,
    every: Duration,
    phase: f64,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    crate::load::read_response(&mut stream, &mut buf).await?;
    count.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(every.mul_f64(phase)).await;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        stream.write_all(request.as_bytes()).await?;
        crate::load::read_response(&mut stream, &mut buf).await?;
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
