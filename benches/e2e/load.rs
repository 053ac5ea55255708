//! A closed-loop HTTP/1.1 load generator (what wrk does): a fixed number of keep-alive
//! connections, each sending its next request as soon as the previous answer is in, for a fixed
//! time. Every request's latency is kept, so percentiles are exact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a load run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Latency of every request, in µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Requests per second over the run.
    pub requests_per_s: f64,
    /// Answers with status 200.
    pub ok: u64,
    /// Answers with another status.
    pub not_ok: u64,
}

impl LoadResult {
    /// The `q` quantile (0..=1) of the latencies, in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }
}

/// The `q` quantile of sorted µs latencies, in ms (NaN when there are none).
pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted_us[i]) / 1000.0
}

/// Sends GETs of `paths` (picked at random) over `connections` connections to `addr` for
/// `duration`, on `threads` threads.
pub fn run(
    addr: std::net::SocketAddr,
    paths: Arc<Vec<String>>,
    connections: usize,
    threads: usize,
    duration: Duration,
) -> std::io::Result<LoadResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (paths, stop) = (paths.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                connection(addr, paths, stop, c as u64).await
            }));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut result = LoadResult {
            latencies_us: Vec::new(),
            requests_per_s: 0.0,
            ok: 0,
            not_ok: 0,
        };
        for task in tasks {
            let (latencies, ok, not_ok) = task.await.map_err(std::io::Error::other)??;
            result.latencies_us.extend(latencies);
            result.ok += ok;
            result.not_ok += not_ok;
        }
        let elapsed = started.elapsed().as_secs_f64();
        result.requests_per_s = result.latencies_us.len() as f64 / elapsed;
        result.latencies_us.sort_unstable();
        Ok(result)
    })
}

type ConnectionResult = std::io::Result<(Vec<u32>, u64, u64)>;

async fn connection(
    addr: std::net::SocketAddr,
    paths: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> ConnectionResult {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut latencies = Vec::new();
    let (mut ok, mut not_ok) = (0, 0);
    let mut buf = Vec::with_capacity(64 * 1024);
    while !stop.load(Ordering::Relaxed) {
        let path = &paths[rng.random_range(0..paths.len())];
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        let sent = Instant::now();
        stream.write_all(request.as_bytes()).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        if status == 200 {
            ok += 1;
        } else {
            not_ok += 1;
        }
    }
    Ok((latencies, ok, not_ok))
}

/// Reads one response (headers and a `Content-Length` body); returns its status.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(std::io::Error::other)?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other("no status line"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .ok_or_else(|| std::io::Error::other("no content-length"))?;
            let total = end + 4 + length;
            while buf.len() < total {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
