//! Sources of decoded events, one per worker. The engine's worker loop polls its source without
//! blocking; a Kafka consumer, an in-memory list and the simulator are all sources.

use crossbeam_channel::{Receiver, TryRecvError};

use crate::events::{DeliveryEvent, RiderEvent};
use crate::simulator::SimEvent;

/// What a poll found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polled {
    /// Events were added to the buffers; there may be more.
    Data,
    /// Nothing right now.
    Idle,
    /// The source is finished; it will never have more.
    Ended,
}

/// A per-worker source of events.
pub trait EventSource: Send {
    /// Moves up to about `max` available events into the buffers, without blocking.
    fn poll(
        &mut self,
        max: usize,
        riders: &mut Vec<RiderEvent>,
        deliveries: &mut Vec<DeliveryEvent>,
    ) -> Polled;

    /// Whether the source has handed out everything that was there when it started (a Kafka
    /// source: the end offsets seen at start). Sources without a backlog are caught up at once.
    fn caught_up(&self) -> bool {
        true
    }

    /// The next offset to read of every partition read so far, as `(topic, partition, offset)`:
    /// what a checkpoint records. Sources without offsets have none.
    fn positions(&self) -> Vec<(String, i32, i64)> {
        Vec::new()
    }
}

/// Events held in memory (or made as they are taken), handed out in order (benchmarks and tests).
pub struct VecSource {
    events: Box<dyn Iterator<Item = SimEvent> + Send>,
}

impl std::fmt::Debug for VecSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VecSource").finish_non_exhaustive()
    }
}

impl Default for VecSource {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl VecSource {
    /// A source that hands out `events` in order.
    pub fn new(events: Vec<SimEvent>) -> Self {
        Self::from_events(events.into_iter())
    }

    /// A source that hands out what `events` yields, made as it is taken, so that the input
    /// need not sit in memory.
    pub fn from_events(events: impl Iterator<Item = SimEvent> + Send + 'static) -> Self {
        Self {
            events: Box::new(events),
        }
    }
}

fn push(event: SimEvent, riders: &mut Vec<RiderEvent>, deliveries: &mut Vec<DeliveryEvent>) {
    match event {
        SimEvent::Rider(e) => riders.push(e),
        SimEvent::Delivery(e) => deliveries.push(e),
    }
}

impl EventSource for VecSource {
    fn poll(
        &mut self,
        max: usize,
        riders: &mut Vec<RiderEvent>,
        deliveries: &mut Vec<DeliveryEvent>,
    ) -> Polled {
        let mut any = false;
        for event in self.events.by_ref().take(max) {
            push(event, riders, deliveries);
            any = true;
        }
        if any {
            Polled::Data
        } else {
            Polled::Ended
        }
    }
}

/// Events sent over a channel (tests, the demo's simulator thread); ends when every sender is gone.
#[derive(Debug)]
pub struct ChannelSource {
    rx: Receiver<Vec<SimEvent>>,
}

impl ChannelSource {
    /// A source fed through `rx`, one batch of events per message.
    pub fn new(rx: Receiver<Vec<SimEvent>>) -> Self {
        Self { rx }
    }
}

impl EventSource for ChannelSource {
    fn poll(
        &mut self,
        max: usize,
        riders: &mut Vec<RiderEvent>,
        deliveries: &mut Vec<DeliveryEvent>,
    ) -> Polled {
        let mut taken = 0;
        loop {
            match self.rx.try_recv() {
                Ok(batch) => {
                    taken += batch.len();
                    batch.into_iter().for_each(|e| push(e, riders, deliveries));
                    if taken >= max {
                        return Polled::Data;
                    }
                }
                Err(TryRecvError::Empty) if taken > 0 => return Polled::Data,
                Err(TryRecvError::Empty) => return Polled::Idle,
                Err(TryRecvError::Disconnected) if taken > 0 => return Polled::Data,
                Err(TryRecvError::Disconnected) => return Polled::Ended,
            }
        }
    }
}
