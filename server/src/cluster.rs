//! The connections between a cluster's processes (`-n/-p/-h`), made here rather than by timely.
//!
//! Timely's own setup retries a refused connection, and polls for incoming ones, once a second:
//! processes a supervisor starts together then often wait a second, twice per start (the
//! checkpoint agreement's dataflow and the engine's), before the first answer. Here the same
//! handshake (each process connects to every lower-numbered one and sends its index, big-endian
//! `u64`, as timely's does) retries every [`RETRY`], and a connection that does not complete the
//! handshake (a port scanner, a health probe) is dropped with a warning instead of a panic.
//! The connected sockets then go to timely's `initialize_networking_from_sockets`.

use std::any::Any;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::Hooks;

/// How long between attempts to connect to a peer, and between polls for peers connecting.
pub const RETRY: Duration = Duration::from_millis(20);

/// How often a process still waiting for a peer says so.
const WAITING_NOTE: Duration = Duration::from_secs(5);

/// How long an accepted connection has to send its index.
const HANDSHAKE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot listen on {address} for the cluster's other processes")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process index {process} is not below the hostfile's {processes} addresses")]
    Index { process: usize, processes: usize },
    #[error("cannot set up the connection to process {peer}")]
    Socket {
        peer: usize,
        #[source]
        source: std::io::Error,
    },
}

/// What timely's `execute_from` takes: a communication builder per local worker (`threads` of
/// them) connected to every other process of `addresses`, and the guard of the network threads.
pub type Builders = (Vec<AllocatorBuilder>, Box<dyn Any + Send>);

/// Connects process `process` to every other process of `addresses` and builds timely's
/// communication over those connections.
pub fn connect(
    process: usize,
    addresses: &[String],
    threads: usize,
) -> Result<Builders, ConnectError> {
    let sockets = sockets(process, addresses)?;
    let hooks = Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) = initialize_networking_from_sockets(
        local, sockets, process, threads, hooks,
    )
    .map_err(|source| ConnectError::Socket {
        peer: process,
        source,
    })?;
    Ok((
        builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        Box::new(guard),
    ))
}

/// A connected socket to every other process, in process order, `None` at `process`.
fn sockets(process: usize, addresses: &[String]) -> Result<Vec<Option<TcpStream>>, ConnectError> {
    let processes = addresses.len();
    if process >= processes {
        return Err(ConnectError::Index { process, processes });
    }
    // Listen first, so that higher-numbered processes can connect while this one dials out.
    let listeners = addresses[process]
        .split_whitespace()
        .map(listen)
        .collect::<Result<Vec<_>, ConnectError>>()?;
    sockets_over(process, addresses, &listeners)
}

fn listen(address: &str) -> Result<TcpListener, ConnectError> {
    let error = |source| ConnectError::Listen {
        address: address.to_owned(),
        source,
    };
    let listener = TcpListener::bind(address).map_err(error)?;
    // Polled, so that the wait can say what it waits for.
    listener.set_nonblocking(true).map_err(error)?;
    Ok(listener)
}

/// [`sockets`] over listeners already bound to this process's address.
fn sockets_over(
    process: usize,
    addresses: &[String],
    listeners: &[TcpListener],
) -> Result<Vec<Option<TcpStream>>, ConnectError> {
    let lower: Vec<String> = addresses[..process].to_vec();
    let dialing = std::thread::spawn(move || {
        lower
            .iter()
            .enumerate()
            .map(|(peer, address)| dial(process, peer, address))
            .collect::<Result<Vec<_>, ConnectError>>()
    });
    let higher = accept(process, addresses.len(), listeners)?;
    let mut all: Vec<Option<TcpStream>> = dialing
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?
        .into_iter()
        .map(Some)
        .collect();
    all.push(None);
    all.extend(higher.into_iter().map(Some));
    Ok(all)
}

/// Connects to `peer` at `address` (retrying until it listens) and sends this process's index.
fn dial(process: usize, peer: usize, address: &str) -> Result<TcpStream, ConnectError> {
    let mut noted = Instant::now();
    loop {
        match TcpStream::connect(address) {
            Ok(mut stream) => {
                let sent = stream
                    .set_nodelay(true)
                    .and_then(|()| stream.write_all(&(process as u64).to_be_bytes()));
                return match sent {
                    Ok(()) => Ok(stream),
                    Err(source) => Err(ConnectError::Socket { peer, source }),
                };
            }
            Err(error) => {
                if noted.elapsed() >= WAITING_NOTE {
                    tracing::info!("waiting for process {peer} at {address}: {error}");
                    noted = Instant::now();
                }
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Accepts a connection from every higher-numbered process, in process order.
fn accept(
    process: usize,
    processes: usize,
    listeners: &[TcpListener],
) -> Result<Vec<TcpStream>, ConnectError> {
    let mut higher: Vec<Option<TcpStream>> = (process + 1..processes).map(|_| None).collect();
    let mut noted = Instant::now();
    while higher.iter().any(Option::is_none) {
        let mut accepted = false;
        for listener in listeners {
            let Ok((stream, from)) = listener.accept() else {
                continue;
            };
            accepted = true;
            match handshake(stream) {
                Ok((peer, stream)) if (process + 1..processes).contains(&peer) => {
                    higher[peer - process - 1] = Some(stream);
                }
                Ok((peer, _)) => {
                    tracing::warn!("a connection from {from} says it is process {peer}, which is not one that connects to process {process}; dropped");
                }
                Err(error) => {
                    tracing::warn!(
                        "a connection from {from} sent no process index ({error}); dropped"
                    );
                }
            }
        }
        if !accepted {
            if noted.elapsed() >= WAITING_NOTE {
                let waiting: Vec<String> = (process + 1..processes)
                    .filter(|p| higher[p - process - 1].is_none())
                    .map(|p| p.to_string())
                    .collect();
                tracing::info!("waiting for process(es) {} to connect", waiting.join(", "));
                noted = Instant::now();
            }
            std::thread::sleep(RETRY);
        }
    }
    Ok(higher.into_iter().flatten().collect())
}

/// Reads a peer's index from a new connection.
fn handshake(mut stream: TcpStream) -> std::io::Result<(usize, TcpStream)> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDSHAKE))?;
    let mut index = [0u8; 8];
    stream.read_exact(&mut index)?;
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    Ok((u64::from_be_bytes(index) as usize, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three processes connect whatever order they start in, each socket to the right peer, and
    /// stray connections to a listener (one that sends nothing, one with an index that does not
    /// connect there) are dropped rather than taken for a process.
    #[test]
    fn processes_connect_in_any_order_and_strays_are_dropped() {
        let mut listeners: Vec<Option<TcpListener>> = (0..3)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").expect("a port");
                l.set_nonblocking(true).expect("nonblocking");
                Some(l)
            })
            .collect();
        let addresses: Vec<String> = listeners
            .iter()
            .flatten()
            .map(|l| l.local_addr().expect("bound").to_string())
            .collect();
        let mut start = |p: usize| {
            let (addresses, listener) = (addresses.clone(), listeners[p].take().expect("once"));
            std::thread::spawn(move || sockets_over(p, &addresses, &[listener]).expect("connected"))
        };
        // Process 0 cannot finish before process 1 connects: the strays reach it first.
        let (last, first) = (start(2), start(0));
        drop(TcpStream::connect(&addresses[0]).expect("listening"));
        let mut wrong = TcpStream::connect(&addresses[0]).expect("listening");
        wrong.write_all(&7u64.to_be_bytes()).expect("sent");
        let middle = start(1);
        let mut results: Vec<Vec<Option<TcpStream>>> = [first, middle, last]
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect();
        for (p, sockets) in results.iter_mut().enumerate() {
            assert_eq!(sockets.len(), 3);
            assert!(sockets[p].is_none(), "no socket to itself");
        }
        // Each pair's sockets are the two ends of one connection.
        let pairs = [(0, 1), (0, 2), (1, 2)];
        for (a, b) in pairs {
            let (at_a, at_b) = (
                results[a][b].as_ref().expect("a to b"),
                results[b][a].as_ref().expect("b to a"),
            );
            assert_eq!(
                at_a.local_addr().expect("addr"),
                at_b.peer_addr().expect("addr")
            );
        }
    }

    #[test]
    fn an_index_beyond_the_hostfile_is_an_error() {
        let err = sockets(2, &["127.0.0.1:1".into(), "127.0.0.1:2".into()]).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "process index 2 is not below the hostfile's 2 addresses"
        );
    }
}
