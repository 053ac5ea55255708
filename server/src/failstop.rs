//! Fail-stop for clusters.
//!
//! A timely cluster has no fault tolerance: once one process is gone, the others can neither make
//! progress nor be trusted to answer, and recovery is a restart of every process from its
//! checkpoint. So a process that loses a peer says so at once (`/readyz` 503) and exits 1, for a
//! supervisor to restart, instead of going on frozen. Two things tell it:
//! - timely's network threads, which panic with "timely communication error" when a peer's
//!   connection ends (a killed process's connections are closed by its kernel);
//! - a watch of the peers' HTTP ports (`--http-peers`), which also sees a peer whose host is gone
//!   or whose link is cut, where no connection ends and a process that sends nothing may never
//!   notice by itself.
//!
//! Any panic of a timely worker thread stops the process the same way: the cluster cannot go on
//! without that worker either.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why the process must stop, once it must.
static FAILED: OnceLock<String> = OnceLock::new();

/// Set once the cluster stops cleanly: peers that go away after that have stopped too.
static STANDING_DOWN: AtomicBool = AtomicBool::new(false);

/// How long a peer may not be reached before it counts as lost: with a probe's own timeout and
/// [`GRACE`], a lost peer ends the process within 5 s (CONTRACT section 7).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a failed process answers `/readyz` 503 before it exits, so that a load balancer or a
/// supervisor polling it sees the failure rather than a connection refused.
const GRACE: Duration = Duration::from_millis(500);

/// How often each peer is tried.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// How long a peer that has never answered is waited for (the processes of a cluster start their
/// HTTP servers at slightly different moments).
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// Records that the process must stop, and stops it: `/readyz` answers 503 from now on, and after
/// [`GRACE`] the process exits 1 with one line saying why. The first reason is kept.
pub fn fail(reason: impl Into<String>) {
    let reason = reason.into();
    if FAILED.set(reason.clone()).is_err() {
        return;
    }
    tracing::error!("{reason}");
    let exit = move || {
        std::thread::sleep(GRACE);
        eprintln!(
            "dongflow: {reason}; exiting so that a supervisor restarts every process of the \
             cluster from its checkpoint"
        );
        std::process::exit(1);
    };
    if std::thread::Builder::new()
        .name("dongflow-fail-stop".into())
        .spawn(exit)
        .is_err()
    {
        std::process::exit(1);
    }
}

/// Says that the cluster is stopping cleanly: from now on a peer that cannot be reached has
/// stopped, not failed.
pub fn stand_down() {
    STANDING_DOWN.store(true, Ordering::Release);
}

/// Why the process must stop, if it must.
pub fn failure() -> Option<&'static str> {
    FAILED.get().map(String::as_str)
}

/// Makes a panic of timely's network or worker threads a failure of the process (after the
/// usual panic message). Other panics are left as they are.
pub fn watch_timely_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let thread = std::thread::current();
        let worker = thread.name().is_some_and(|n| n.starts_with("timely:work"));
        if message.starts_with("timely communication error") {
            fail(format!("lost a peer of the timely cluster ({message})"));
        } else if worker {
            fail(format!("a timely worker failed ({message})"));
        }
    }));
}

/// Watches the HTTP ports of the other processes (`peers`, base URLs in process order; `me` is
/// this process) from a thread of its own: a peer that cannot be reached for [`PEER_TIMEOUT`]
/// (or never answers within [`FIRST_ANSWER_WITHIN`] of the start) is a lost peer.
pub fn watch_peers(peers: &[String], me: usize) -> std::io::Result<()> {
    let targets: Vec<(usize, String)> = peers
        .iter()
        .enumerate()
        .filter(|(p, _)| *p != me)
        .map(|(p, url)| (p, url.clone()))
        .collect();
    if targets.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("dongflow-peer-watch".into())
        .spawn(move || {
            let started = Instant::now();
            let mut last_answer: Vec<Option<Instant>> = vec![None; targets.len()];
            while failure().is_none() && !STANDING_DOWN.load(Ordering::Acquire) {
                for (i, (process, url)) in targets.iter().enumerate() {
                    if reachable(url) {
                        last_answer[i] = Some(Instant::now());
                        continue;
                    }
                    let lost = match last_answer[i] {
                        Some(t) => t.elapsed() >= PEER_TIMEOUT,
                        None => started.elapsed() >= FIRST_ANSWER_WITHIN,
                    };
                    if lost && !STANDING_DOWN.load(Ordering::Acquire) {
                        fail(format!(
                            "lost a peer of the timely cluster (process {process} at {url} not \
                             reachable for {PEER_TIMEOUT:?})"
                        ));
                    }
                }
                std::thread::sleep(PROBE_EVERY);
            }
        })
        .map(|_| ())
}

/// Whether a TCP connection to the host and port of `url` (`http://host:port`) opens within a
/// second: the peer process is there and the path to it works.
fn reachable(url: &str) -> bool {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let addrs: Vec<SocketAddr> = match authority.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(_) => return false,
    };
    addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_reachable_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        assert!(reachable(&url));
        drop(listener);
        assert!(!reachable(&url));
        assert!(!reachable("http://no such host:1"));
    }
}
