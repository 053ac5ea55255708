//! The upsert stage: events in, the latest state per id kept, and what changed sent on.
//!
//! Events are exchanged by id, stashed per dataflow time, and applied in time order once the input
//! frontier has passed that time; within a time, in arrival order (which, per id, is partition
//! order). Applying follows CONTRACT section 3: per id, a lower `ts` than the latest applied one is
//! stale and ignored; an equal `ts` applies (the later arrival wins). For each time the operator
//! sends on each changed id once, from its state before the time to its state after.
//!
//! A [`UpsertRule`] says how an event changes a state and what goes on downstream. The state lives
//! in an [`UpsertState`] shared with the worker loop, so that it can be checkpointed. A restart
//! brings a checkpoint's state back through a second input ([`Seed`]s, exchanged by id like the
//! events, so that each id reaches the worker that owns it whatever the worker count); a seeded
//! state goes on at the seeds' time, before any event of a later time is applied. A third input
//! carries updates from elsewhere that change the states of their ids after each time's events (a
//! rider's active deliveries, which its snapshot holds): one state per id, not a second map.
//!
//! Terminal states ("tombstones") are remembered by id and expiry alone ([`Tombstones`]) for `ttl`
//! of dataflow time, so that late and duplicate events cannot bring an id back, and are then
//! dropped, so that memory stays bounded. Idle states (a rider off shift) are forgotten once
//! unchanged for a time to live of their own ([`Idle`]), and late events of a forgotten id stay
//! stale.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::hashable::Hashable;
use dongflow_records::{Id, Millis};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::Stream;

use crate::idle::Idle;
use crate::table::{Copied, Table, SHARDS};
use crate::tombstones::Tombstones;
use crate::types::{Diff, Time};

/// Why an event was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Its `ts` is lower than the latest applied `ts` of its id.
    Stale,
    /// Its id has reached a terminal state.
    AfterTerminal,
}

/// How events of one kind change the state of their id, and what the operator sends on.
pub trait UpsertRule: 'static {
    /// The input event.
    type Event: timely::ExchangeData;
    /// The state kept per id.
    type State: Clone + std::fmt::Debug + 'static;
    /// What a checkpoint keeps of a state, and a restart seeds it from (exchanged by id).
    type Saved: timely::ExchangeData + Clone + std::fmt::Debug;
    /// Updates of a second input, by id, that change the states of their ids after each time's
    /// events (a rider's active deliveries); `()` for a rule without one.
    type Side: timely::ExchangeData;
    /// What the operator sends on for an id that a time changed.
    type Out: timely::ExchangeData;
    /// What the rule keeps per worker beside the states (the side updates of ids with no state).
    type Extra: Default + std::fmt::Debug + 'static;
    /// The id an event belongs to.
    fn id(event: &Self::Event) -> &Id;
    /// The event's `ts`.
    fn ts(event: &Self::Event) -> Millis;
    /// The new state after `event`, or why it is ignored.
    fn apply(current: Option<&Self::State>, event: Self::Event) -> Result<Self::State, Ignored>;
    /// Whether the state is terminal: it shows nothing, and its id is remembered (without the
    /// state) for the ttl only, to absorb every later event.
    fn is_tombstone(state: &Self::State) -> bool;
    /// Whether the state may be forgotten once no event has changed it for the idle ttl, and if
    /// so its `ts`. An idle state shows nothing. None are, unless a rule says so.
    fn idle(_state: &Self::State) -> Option<Millis> {
        None
    }
    /// What a checkpoint keeps of `state`.
    fn save(state: &Self::State) -> Self::Saved;
    /// The state a checkpoint kept as `saved`.
    fn load(saved: Self::Saved) -> Self::State;
    /// A state made for `id`, which had none, takes what `extra` kept of the id.
    fn adopt(_state: &mut Self::State, _id: &Id, _extra: &mut Self::Extra) {}
    /// `id`'s state leaves the map (forgotten once idle, or replaced by a seeded one): `extra`
    /// keeps what must outlive it.
    fn release(_id: Id, _state: Self::State, _extra: &mut Self::Extra) {}
    /// Applies one time's side updates of `id` (in arrival order) to its state, or to `extra`
    /// while it has none.
    fn apply_side(
        _state: Option<&mut Self::State>,
        _id: &Id,
        _updates: Vec<(Self::Side, Diff)>,
        _extra: &mut Self::Extra,
    ) {
    }
    /// What goes on for `id`, changed at `time` from `old` to `new` (`None`: no state).
    fn emit(
        id: &Id,
        old: Option<&Self::State>,
        new: Option<&Self::State>,
        time: Time,
        out: &mut Vec<Self::Out>,
    );
}

/// One id's state, with the last time it changed (so that a time's first change is noticed
/// without a second map).
#[derive(Debug)]
struct Slot<U: UpsertRule> {
    state: U::State,
    touched_at: Time,
}

impl<U: UpsertRule> Copied for Slot<U> {
    type Copy = U::Saved;
    fn copied(&self) -> U::Saved {
        U::save(&self.state)
    }
}

/// Marks a slot that no time has changed yet.
const UNTOUCHED: Time = Time::MAX;

/// The state of one upsert operator on one worker.
#[derive(Debug)]
pub struct UpsertState<U: UpsertRule> {
    /// Latest state per id, tombstones aside.
    entries: Table<Slot<U>>,
    /// The ids whose state is terminal, until their ttl runs out.
    ended: Tombstones,
    /// How long a tombstone is kept, in dataflow time (ms).
    pub ttl: Time,
    /// The ids whose state is idle, until their own ttl runs out.
    idle: Idle,
    /// What the rule keeps beside the states.
    extra: U::Extra,
}

impl<U: UpsertRule> UpsertState<U> {
    /// An empty state whose tombstones live for `ttl` ms.
    pub fn new(ttl: Time) -> Self {
        Self {
            entries: Table::default(),
            ended: Tombstones::default(),
            ttl,
            idle: Idle::default(),
            extra: U::Extra::default(),
        }
    }

    /// What the rule keeps beside the states.
    pub fn extra(&self) -> &U::Extra {
        &self.extra
    }

    /// Idle states are forgotten once unchanged for `ttl` ms (`None`: kept for good).
    pub fn forget_idle_after(&mut self, ttl: Option<Time>) {
        self.idle = Idle::new(ttl);
    }

    /// Events of ids not held with a `ts` below this are stale (a checkpoint's, at a restart).
    pub fn set_forgotten_through(&mut self, ts: Millis) {
        self.idle.forgot(ts);
    }

    /// The idle ids queued to be forgotten, and the horizon of forgotten ones.
    pub fn idle(&self) -> &Idle {
        &self.idle
    }

    /// A shared handle, as the operator and the worker loop both hold it.
    pub fn shared(ttl: Time) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self::new(ttl)))
    }

    /// Returns the map's room once most of its ids have ended: a map keeps its largest size
    /// otherwise, and a burst of deliveries that end would cost a live delivery's room each for good.
    fn give_back_room(&mut self) {
        self.entries.give_back_room(KEEP_ROOM / SHARDS);
        self.idle.give_back_room();
    }

    /// The number of ids held (tombstones included).
    pub fn len(&self) -> usize {
        self.entries.len() + self.ended.len()
    }

    /// The number of tombstones held.
    pub fn tombstones(&self) -> usize {
        self.ended.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.ended.is_empty()
    }

    /// The state of one id that is not terminal.
    pub fn get(&self, id: &Id) -> Option<&U::State> {
        self.entries.get(id).map(|slot| &slot.state)
    }

    /// Whether `id` is terminal (remembered until its ttl runs out).
    pub fn is_ended(&self, id: &Id) -> bool {
        self.ended.contains(id)
    }

    /// Every id that is not terminal, with its state.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &U::State)> {
        self.entries.iter().map(|(id, slot)| (id, &slot.state))
    }

    /// The tombstones with their expiry times, oldest first.
    pub fn tombstone_expiry(&self) -> impl Iterator<Item = &(Time, Id)> {
        self.ended.iter()
    }

    /// A copy of every live id's state and of the tombstones with their expiry times, for a
    /// checkpoint, taken all at once (the operator takes one in steps instead).
    pub fn snapshot(&mut self, time: Time) -> StateSnapshot<U::Saved> {
        let mut snapshot = self.begin_snapshot(time);
        snapshot.entries = self.snapshot_step(usize::MAX).unwrap_or_default();
        snapshot
    }

    /// Begins a snapshot of the state as it is now, the state at `time`: the tombstones and idle
    /// ids are copied now, the live states by [`Self::snapshot_step`], a few shards at a time
    /// (changes made meanwhile do not reach the copy).
    pub fn begin_snapshot(&mut self, time: Time) -> StateSnapshot<U::Saved> {
        self.entries.begin_copy();
        StateSnapshot {
            time,
            entries: Vec::new(),
            expiry: self.ended.iter().cloned().collect(),
            // Only the entries of ids unchanged since: a later one of the same id is queued too.
            idle: self
                .idle
                .iter()
                .filter(|(since, id)| {
                    self.entries
                        .get(id)
                        .is_some_and(|slot| unchanged_since(slot.touched_at, *since))
                })
                .map(|(since, id)| (since, id.clone()))
                .collect(),
            forgotten_through: self.idle.forgotten_through,
        }
    }

    /// Copies about `budget` more live states of the snapshot begun; returns them all once done.
    pub fn snapshot_step(&mut self, budget: usize) -> Option<Vec<(Id, U::Saved)>> {
        self.entries.copy_some(budget)
    }

    /// Puts seeds in (one time's, every worker's share that this worker owns), recording in
    /// `touched` the state each seeded id had before (once per id), as [`apply_time`] does.
    ///
    /// Tombstones go in first: an id among them stays one, whether or not a live state of it is
    /// seeded too (as checkpoints written before tombstones were kept apart list them).
    fn restore(&mut self, seeds: Vec<Vec<Seed<U::Saved>>>, touched: &mut Touched<U>) {
        let (mut ended, mut live, mut idle) = (Vec::new(), Vec::new(), Vec::new());
        for seed in seeds.into_iter().flatten() {
            match seed {
                Seed::Ended(expires, id) => ended.push((expires, id)),
                Seed::Live(id, saved) => live.push((id, U::load(saved))),
                Seed::Idle(since, id) => idle.push((since, id)),
            }
        }
        // In expiry order, so that the queue's front expires first.
        ended.sort();
        for (expires, id) in ended {
            if let Some(old) = self.entries.remove(&id) {
                touched.push((id.clone(), Some(old.state)));
            }
            self.ended.insert(expires, id);
        }
        for (id, mut state) in live {
            if self.ended.contains(&id) {
                continue;
            }
            // What the side input gave a state this one replaces goes over to it.
            let old = self.entries.remove(&id).map(|slot| slot.state);
            if let Some(old) = &old {
                U::release(id.clone(), old.clone(), &mut self.extra);
            }
            U::adopt(&mut state, &id, &mut self.extra);
            let slot = Slot {
                state,
                touched_at: UNTOUCHED,
            };
            self.entries.insert(id.clone(), slot);
            touched.push((id, old));
        }
        // In the order they became idle, so that the queue's front comes due first.
        idle.sort();
        for (since, id) in idle {
            self.idle.push(since, id);
        }
    }
}

/// Whether a slot last changed at `touched_at` is unchanged since `since` (a seeded slot that no
/// event changed counts as unchanged: its queued time came with it).
fn unchanged_since(touched_at: Time, since: Time) -> bool {
    touched_at == since || touched_at == UNTOUCHED
}

/// One id's state from a checkpoint, on its way to the worker that owns the id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Seed<S> {
    /// A terminal id, remembered until this time.
    Ended(Time, Id),
    /// A live id's state.
    Live(Id, S),
    /// A live id whose state has been idle since this time.
    Idle(Time, Id),
}

impl<S> Seed<S> {
    /// The id seeded.
    pub fn id(&self) -> &Id {
        match self {
            Seed::Ended(_, id) | Seed::Live(id, _) | Seed::Idle(_, id) => id,
        }
    }
}

/// One upsert operator's state as it was once every time up to `time` was applied, and nothing
/// after: the state part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot<S> {
    /// The dataflow time the state is complete through.
    pub time: Time,
    /// Every live id's state (in checkpoints of earlier versions, tombstones' too).
    pub entries: Vec<(Id, S)>,
    /// The tombstones, with when each expires.
    pub expiry: Vec<(Time, Id)>,
    /// The live ids whose state is idle, with the time each became so.
    pub idle: Vec<(Time, Id)>,
    /// The newest `ts` of a forgotten idle state (see [`Idle::forgotten_through`]).
    pub forgotten_through: Millis,
}

impl<S: Clone> StateSnapshot<S> {
    /// Share `part` of `parts` of the snapshot's ids as seeds: each worker of a process gives one
    /// share, and the upsert's exchange takes every id to its owner.
    pub fn seeds(&self, part: usize, parts: usize) -> impl Iterator<Item = Seed<S>> + '_ {
        let parts = parts.max(1);
        let ended = self.expiry.iter().skip(part).step_by(parts);
        let live = self.entries.iter().skip(part).step_by(parts);
        let idle = self.idle.iter().skip(part).step_by(parts);
        ended
            .map(|(expires, id)| Seed::Ended(*expires, id.clone()))
            .chain(live.map(|(id, state)| Seed::Live(id.clone(), state.clone())))
            .chain(idle.map(|(since, id)| Seed::Idle(*since, id.clone())))
    }
}

impl<S> StateSnapshot<S> {
    /// The same snapshot with each live id's state turned by `f` (a checkpoint read in an earlier
    /// layout of the states).
    pub fn map_states<T>(self, mut f: impl FnMut(S) -> T) -> StateSnapshot<T> {
        StateSnapshot {
            time: self.time,
            entries: self.entries.into_iter().map(|(id, s)| (id, f(s))).collect(),
            expiry: self.expiry,
            idle: self.idle,
            forgotten_through: self.forgotten_through,
        }
    }

    /// Takes in another worker's part of the same time.
    pub fn absorb(&mut self, part: StateSnapshot<S>) {
        self.entries.extend(part.entries);
        self.expiry.extend(part.expiry);
        self.idle.extend(part.idle);
        self.forgotten_through = self.forgotten_through.max(part.forgotten_through);
    }
}

impl<S> Default for StateSnapshot<S> {
    fn default() -> Self {
        Self {
            time: 0,
            entries: Vec::new(),
            expiry: Vec::new(),
            idle: Vec::new(),
            forgotten_through: 0,
        }
    }
}

/// How the worker loop asks an upsert operator for a [`StateSnapshot`] and receives it.
#[derive(Debug)]
pub struct SnapshotSlot<S> {
    /// The time to snapshot at, once the operator's input is complete through it.
    pub requested: Cell<Option<Time>>,
    /// The snapshot being copied, the longest step of it so far, and the time its beginning
    /// took (counted into the step that follows it).
    copying: RefCell<Option<(StateSnapshot<S>, Duration, Duration)>>,
    /// The snapshot taken, and the longest the worker paused for a step of copying it.
    pub taken: RefCell<Option<(StateSnapshot<S>, Duration)>>,
}

impl<S> Default for SnapshotSlot<S> {
    fn default() -> Self {
        Self {
            requested: Cell::new(None),
            copying: RefCell::new(None),
            taken: RefCell::new(None),
        }
    }
}

/// How many live states a step of copying takes, about a millisecond's work: between steps the
/// worker goes on with its other work.
const COPY_STEP: usize = 8 * 1024;

impl<S> SnapshotSlot<S> {
    /// Begins the requested snapshot if `time` (the next time to apply, or `None` once the input
    /// is complete through the request) has passed it.
    fn maybe_take<U: UpsertRule<Saved = S>>(&self, state: &mut UpsertState<U>, next: Option<Time>) {
        let Some(at) = self.requested.get() else {
            return;
        };
        if next.is_none_or(|t| t > at) {
            let started = Instant::now();
            let snapshot = state.begin_snapshot(at);
            *self.copying.borrow_mut() = Some((snapshot, Duration::ZERO, started.elapsed()));
            self.requested.set(None);
        }
    }

    /// Copies a step of the snapshot under way, if any; says whether more is left. A snapshot
    /// copied whole goes to `taken`.
    fn copy_step<U: UpsertRule<Saved = S>>(&self, state: &mut UpsertState<U>) -> bool {
        let mut copying = self.copying.borrow_mut();
        let Some((snapshot, longest, begun)) = copying.as_mut() else {
            return false;
        };
        let started = Instant::now();
        let done = state.snapshot_step(COPY_STEP);
        *longest = (*longest).max(std::mem::take(begun) + started.elapsed());
        let Some(entries) = done else {
            return true;
        };
        snapshot.entries = entries;
        *self.taken.borrow_mut() = copying
            .take()
            .map(|(snapshot, longest, _)| (snapshot, longest));
        false
    }
}

/// Counters of one kind of upsert, shared by every worker of a process.
#[derive(Debug, Default)]
pub struct UpsertCounters {
    /// Events applied.
    pub applied: AtomicU64,
    /// Events ignored as stale.
    pub stale: AtomicU64,
    /// Events ignored because their id was terminal.
    pub after_terminal: AtomicU64,
    /// Tombstones dropped after their ttl.
    pub expired: AtomicU64,
    /// Idle states forgotten after their ttl.
    pub forgotten: AtomicU64,
}

impl UpsertCounters {
    fn add(&self, applied: u64, stale: u64, after_terminal: u64, expired: u64, forgotten: u64) {
        // Relaxed: these are statistics, read without ordering requirements.
        for (counter, n) in [
            (&self.applied, applied),
            (&self.stale, stale),
            (&self.after_terminal, after_terminal),
            (&self.expired, expired),
            (&self.forgotten, forgotten),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Each id a time changed, with the state it had before (once per id).
type Touched<U> = Vec<(Id, Option<<U as UpsertRule>::State>)>;

/// One update of the side input: an id's side value, at a time, with a multiplicity.
pub type SideUpdate<U> = ((Id, <U as UpsertRule>::Side), Time, Diff);

/// Differential updates waiting for their time to complete, by time, with a capability for each.
pub(crate) type UpdateStash<D> = BTreeMap<Time, (Capability<Time>, Vec<(D, Diff)>)>;

/// Events waiting for their time to complete, as received, with a capability for each time.
type Stash<E> = BTreeMap<Time, (Capability<Time>, Vec<Vec<E>>)>;

/// Applies `events` to `state` by the rule `U`, and then each time's `side` updates; sends on what
/// [`UpsertRule::emit`] makes of every id a time changed.
///
/// ```
/// use dongflow_dataflow::upsert::{upsert, UpsertCounters, UpsertState};
/// use dongflow_dataflow::stages::{DeliveryRule, Enriched};
/// use dongflow_records::{DeliveryEvent, DeliveryStatus};
/// use timely::dataflow::operators::{ToStream, Capture, capture::Extract};
/// use timely::dataflow::operators::generic::operator::empty;
/// use std::sync::Arc;
///
/// let rx = timely::example(|scope| {
///     let e = |ts, status| Enriched { event: DeliveryEvent::bare("d-1".into(), status, ts), district: Some(4) };
///     // A stale event (ts 3 after ts 5) is ignored.
///     let events = vec![e(5, DeliveryStatus::Waiting), e(3, DeliveryStatus::Created)].to_stream(scope);
///     let counters = Arc::new(UpsertCounters::default());
///     let state = UpsertState::shared(1000);
///     upsert::<DeliveryRule>(events.container::<Vec<_>>(), empty(scope), empty(scope), "Upsert: Deliveries", state, counters, Default::default())
///         .capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// assert_eq!(out.len(), 1);
/// let ((_, row), _, diff) = &out[0];
/// assert_eq!((row.status, row.ts, *diff), (DeliveryStatus::Waiting, 5, 1));
/// ```
pub fn upsert<'s, U: UpsertRule>(
    events: Stream<'s, Time, Vec<U::Event>>,
    seeds: Stream<'s, Time, Vec<Seed<U::Saved>>>,
    side: Stream<'s, Time, Vec<SideUpdate<U>>>,
    name: &str,
    state: Rc<RefCell<UpsertState<U>>>,
    counters: Arc<UpsertCounters>,
    snapshots: Rc<SnapshotSlot<U::Saved>>,
) -> Stream<'s, Time, Vec<U::Out>> {
    let scope = events.scope();
    let mut builder = OperatorBuilder::new(name.to_owned(), scope);
    // Route every event, seed and side update of an id to the one worker that owns its state.
    let mut events_in = builder.new_input(events, Exchange::new(|e: &U::Event| U::id(e).hashed()));
    let by_id = Exchange::new(|s: &Seed<U::Saved>| s.id().hashed());
    let mut seeds_in = builder.new_input(seeds, by_id);
    let side_by_id = Exchange::new(|((id, _), _, _): &SideUpdate<U>| id.hashed());
    let mut side_in = builder.new_input(side, side_by_id);
    let (output, stream) = builder.new_output::<Vec<U::Out>>();
    let mut output = OutputBuilder::from(output);
    // A checkpoint's copy goes on in steps, each at a later activation.
    let activator = scope.activator_for(builder.operator_info().address);
    builder.build(move |initial| {
        // Output goes only at the times of input: the operator holds no capability of its own.
        drop(initial);
        // Received containers are kept as they came, not copied into one.
        let mut stash: Stash<U::Event> = BTreeMap::new();
        let mut seeded: Stash<Seed<U::Saved>> = BTreeMap::new();
        let mut sides: UpdateStash<(Id, U::Side)> = BTreeMap::new();
        let mut touched: Touched<U> = Vec::new();
        let mut out: Vec<U::Out> = Vec::new();
        move |frontiers| {
            let mut output = output.activate();
            seeds_in.for_each(|cap, data| keep(&mut seeded, cap, data));
            events_in.for_each(|cap, data| keep(&mut stash, cap, data));
            side_in.for_each(|cap, data| keep_updates(&mut sides, &cap, data));
            let complete = |t: &Time| frontiers.iter().all(|f| !f.less_equal(t));
            // Apply complete times in time order: nothing of an earlier time can still arrive.
            // A time's seeds go in first, then its events, then its side updates.
            let mut largest = 0;
            loop {
                let next = seeded.keys().chain(stash.keys()).chain(sides.keys()).min();
                let Some(time) = next.copied().filter(|t| complete(t)) else {
                    break;
                };
                // A checkpoint's state holds every time up to its own and nothing after.
                let mut state = state.borrow_mut();
                snapshots.maybe_take(&mut state, Some(time));
                // `time` is a key of at least one of the three: its capability is kept.
                let mut cap = None;
                let reseeded = seeded.remove(&time).map(|(c, seeds)| {
                    state.restore(seeds, &mut touched);
                    cap = Some(c);
                });
                if let Some((c, events)) = stash.remove(&time) {
                    apply_time::<U>(&mut state, time, events, &mut touched, &counters);
                    cap = cap.or(Some(c));
                }
                if let Some((c, updates)) = sides.remove(&time) {
                    apply_sides::<U>(&mut state, time, updates, &mut touched);
                    cap = cap.or(Some(c));
                }
                if reseeded.is_some() {
                    // A seeded id that the same time changes again is listed twice: the first
                    // entry holds its state before the time.
                    let mut seen = FxHashSet::default();
                    touched.retain(|(id, _)| seen.insert(id.clone()));
                }
                largest = largest.max(touched.len());
                for (id, old) in touched.drain(..) {
                    U::emit(&id, old.as_ref(), state.get(&id), time, &mut out);
                }
                if let Some(cap) = cap.filter(|_| !out.is_empty()) {
                    output.session(&cap).give_container(&mut out);
                }
            }
            give_back_buffer(&mut touched, largest);
            // Time passes without events too: what ran out by the frontier goes (it shows
            // nothing, so no output), unless a checkpoint waits for an earlier time.
            let passed = frontiers
                .iter()
                .filter_map(|f| f.frontier().iter().min().copied())
                .min();
            if let Some(now) = passed.and_then(|t| t.checked_sub(1)) {
                if snapshots.requested.get().is_none() {
                    let mut state = state.borrow_mut();
                    let (expired, forgotten) = run_out::<U>(&mut state, now);
                    counters.add(0, 0, 0, expired, forgotten);
                }
            }
            state.borrow_mut().give_back_room();
            // Complete through the requested time with nothing later applied yet.
            if let Some(at) = snapshots.requested.get() {
                if complete(&at) {
                    snapshots.maybe_take(&mut state.borrow_mut(), None);
                }
            }
            if snapshots.copy_step(&mut state.borrow_mut()) {
                activator.activate();
            }
        }
    });
    stream
}

/// Keeps a received container under its time, with a capability for it.
fn keep<D>(stash: &mut Stash<D>, cap: InputCapability<Time>, data: &mut Vec<D>) {
    let (Some(&time), Some(retained)) = (cap.least(), cap.retain_least(0)) else {
        return;
    };
    stash
        .entry(time)
        .or_insert_with(|| (retained, Vec::new()))
        .1
        .push(std::mem::take(data));
}

/// Keeps each received update under its own time (which may be later than its container's), with
/// a capability for that time.
pub(crate) fn keep_updates<D>(
    stash: &mut UpdateStash<D>,
    cap: &InputCapability<Time>,
    data: &mut Vec<(D, Time, Diff)>,
) {
    for (update, time, diff) in data.drain(..) {
        stash
            .entry(time)
            .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()))
            .1
            .push((update, diff));
    }
}

/// Room for this many changed ids, or map entries, is always kept.
const KEEP_ROOM: usize = 1024;

/// Returns the room of a per-time buffer (a time's changed ids, each with a whole state) that a
/// burst left, once the times of an activation are far smaller than it (`used`: the most at one
/// time) or none came. Sustained large times keep their room.
pub(crate) fn give_back_buffer<T>(buffer: &mut Vec<T>, used: usize) {
    if buffer.capacity() > 4 * used.max(KEEP_ROOM) {
        buffer.shrink_to(used.max(KEEP_ROOM));
    }
}

/// Returns the room of a map that a burst left once most of its keys are gone: the map never
/// shrinks by itself.
pub(crate) fn give_back_map<K, V>(map: &mut FxHashMap<K, V>)
where
    K: std::hash::Hash + Eq,
{
    let len = map.len();
    if map.capacity() > 4 * len.max(KEEP_ROOM) {
        map.shrink_to(2 * len);
    }
}

/// Applies one time's events to the state, recording in `touched` the state each changed id had
/// before this time (once per id).
fn apply_time<U: UpsertRule>(
    state: &mut UpsertState<U>,
    time: Time,
    events: Vec<Vec<U::Event>>,
    touched: &mut Touched<U>,
    counters: &UpsertCounters,
) {
    let (mut applied, mut stale, mut after_terminal) = (0, 0, 0);
    let (expired, forgotten) = run_out::<U>(state, time);
    let expires = time.saturating_add(state.ttl);
    for event in events.into_iter().flatten() {
        let id = U::id(&event).clone();
        if state.ended.contains(&id) {
            after_terminal += 1;
            continue;
        }
        let slot = state.entries.get_mut(&id);
        if slot.is_none() && state.idle.is_late(U::ts(&event)) {
            // Older than a forgotten state's last event: it may be that state's late event.
            stale += 1;
            continue;
        }
        let current = slot.as_ref().map(|slot| &slot.state);
        let new = match U::apply(current, event) {
            Ok(new) => new,
            Err(Ignored::Stale) => {
                stale += 1;
                continue;
            }
            Err(Ignored::AfterTerminal) => {
                after_terminal += 1;
                continue;
            }
        };
        applied += 1;
        let ended = U::is_tombstone(&new);
        if U::idle(&new).is_some() {
            state.idle.push(time, id.clone());
        }
        match slot {
            Some(slot) => {
                if slot.touched_at != time {
                    slot.touched_at = time;
                    touched.push((id.clone(), Some(slot.state.clone())));
                }
                if ended {
                    state.entries.remove(&id);
                } else {
                    slot.state = new;
                }
            }
            None => {
                touched.push((id.clone(), None));
                if !ended {
                    let mut new = new;
                    U::adopt(&mut new, &id, &mut state.extra);
                    let slot = Slot {
                        state: new,
                        touched_at: time,
                    };
                    state.entries.insert(id.clone(), slot);
                }
            }
        }
        if ended {
            state.ended.insert(expires, id);
        }
    }
    counters.add(applied, stale, after_terminal, expired, forgotten);
}

/// Applies one time's side updates, by id, recording in `touched` the state each changed id had
/// before this time if the time's events did not already. A side update leaves the slot's last
/// change as it was: it is not an event, and an idle state stays due to be forgotten.
fn apply_sides<U: UpsertRule>(
    state: &mut UpsertState<U>,
    time: Time,
    mut updates: Vec<((Id, U::Side), Diff)>,
    touched: &mut Touched<U>,
) {
    // Stable: each id's updates stay in arrival order.
    updates.sort_by(|((a, _), _), ((b, _), _)| a.cmp(b));
    let mut updates = updates.into_iter().peekable();
    let mut of_id = Vec::new();
    while let Some(((id, first), diff)) = updates.next() {
        of_id.push((first, diff));
        while let Some(((_, update), diff)) = updates.next_if(|((next, _), _)| *next == id) {
            of_id.push((update, diff));
        }
        let of_id = std::mem::take(&mut of_id);
        match state.entries.get_mut(&id) {
            Some(slot) => {
                if slot.touched_at != time {
                    touched.push((id.clone(), Some(slot.state.clone())));
                }
                U::apply_side(Some(&mut slot.state), &id, of_id, &mut state.extra);
            }
            None => U::apply_side(None, &id, of_id, &mut state.extra),
        }
    }
}

/// Drops the tombstones and forgets the idle states whose ttl has run out by `now`, and says how
/// many of each.
fn run_out<U: UpsertRule>(state: &mut UpsertState<U>, now: Time) -> (u64, u64) {
    (state.ended.expire(now), forget_idle::<U>(state, now))
}

/// Forgets the idle states unchanged for the idle ttl by `now` whose own `ts` the dataflow's time
/// has passed, and says how many. An idle state shows no rows, so nothing downstream changes.
fn forget_idle<U: UpsertRule>(state: &mut UpsertState<U>, now: Time) -> u64 {
    let mut forgotten = 0;
    while let Some((since, id)) = state.idle.pop_due(now) {
        let Some(slot) = state.entries.get(&id) else {
            continue;
        };
        let Some(ts) = U::idle(&slot.state).filter(|_| unchanged_since(slot.touched_at, since))
        else {
            continue;
        };
        if ts > now {
            // Its clock runs ahead of the dataflow's: forgetting it now would refuse events of
            // new ids up to that `ts`. Looked at again once the time has passed it.
            state.idle.wait_for_clock(ts, since, id);
            continue;
        }
        if let Some(slot) = state.entries.remove(&id) {
            U::release(id, slot.state, &mut state.extra);
        }
        state.idle.forgot(ts);
        forgotten += 1;
    }
    forgotten
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{DeliveryRule, DeliveryState, Enriched};
    use crate::types::DeliveryRow;
    use dongflow_records::{DeliveryEvent, DeliveryStatus};
    use timely::dataflow::operators::capture::{Capture, Extract};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::Probe;

    /// The worker that owns `key` among `peers` workers: where an exchange by the key's hash sends
    /// it (timely masks the hash when `peers` is a power of two, and takes the remainder
    /// otherwise). Only tests use it: production code routes by the exchange itself.
    fn owner<K: Hashable<Output = u64>>(key: &K, peers: usize) -> usize {
        let peers = peers.max(1) as u64;
        let hash = key.hashed();
        let index = if peers.is_power_of_two() {
            hash & (peers - 1)
        } else {
            hash % peers
        };
        index as usize
    }

    fn event(id: &str, status: DeliveryStatus, ts: u64) -> Enriched<DeliveryEvent> {
        let event = DeliveryEvent::bare(id.into(), status, ts);
        Enriched {
            event,
            district: Some(0),
        }
    }

    type Update = ((Id, DeliveryRow), Time, Diff);
    type Output = Vec<Update>;

    /// A delivery row with a status and nothing else known.
    fn bare_row(status: DeliveryStatus, ts: u64) -> DeliveryRow {
        DeliveryRow {
            status,
            pickup_district: 0,
            rider_id: None.into(),
            vehicle: None,
            ts,
        }
    }

    type EventInput =
        timely::dataflow::operators::vec::input::Handle<Time, Enriched<DeliveryEvent>>;
    type SeedInput = timely::dataflow::operators::vec::input::Handle<Time, Seed<DeliveryState>>;

    /// A delivery upsert over `st`, with its event and seed inputs.
    fn delivery_upsert<'s>(
        scope: timely::dataflow::Scope<'s, Time>,
        st: Rc<RefCell<UpsertState<DeliveryRule>>>,
        counters: Arc<UpsertCounters>,
    ) -> (EventInput, SeedInput, Stream<'s, Time, Vec<Update>>) {
        let (input, stream) = scope.new_input::<Enriched<DeliveryEvent>>();
        let (seeds, seeded) = scope.new_input::<Seed<DeliveryState>>();
        let no_side = timely::dataflow::operators::generic::operator::empty(scope);
        let out = upsert::<DeliveryRule>(
            stream,
            seeded,
            no_side,
            "Upsert",
            st,
            counters,
            Rc::default(),
        );
        (input, seeds, out)
    }

    /// Feeds `(time, events)` rounds through a delivery upsert with the given ttl; returns the
    /// output, the final state size and the counters.
    fn run(
        ttl: Time,
        seed: Vec<(Id, DeliveryState)>,
        rounds: Vec<(Time, Vec<Enriched<DeliveryEvent>>)>,
    ) -> (Output, usize, Arc<UpsertCounters>) {
        let counters = Arc::new(UpsertCounters::default());
        let c = counters.clone();
        let output = timely::execute_directly(move |worker| {
            let st = UpsertState::shared(ttl);
            let (mut input, mut seeds, probe, rx) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, seeds, out) = delivery_upsert(scope, st.clone(), c.clone());
                let (probe, stream) = out.probe();
                (input, seeds, probe, stream.capture())
            });
            // Seeded at time 0, as a restart seeds a checkpoint before any event.
            for (id, s) in seed {
                match DeliveryRule::is_tombstone(&s) {
                    true => seeds.send(Seed::Ended(ttl, id)),
                    false => seeds.send(Seed::Live(id, s)),
                }
            }
            seeds.close();
            for (time, events) in rounds {
                input.advance_to(time);
                for e in events {
                    input.send(e);
                }
            }
            input.close();
            worker.step_while(|| !probe.done());
            let len = st.borrow().len();
            (
                rx.extract()
                    .into_iter()
                    .flat_map(|(_, v)| v)
                    .collect::<Output>(),
                len,
            )
        });
        (output.0, output.1, counters)
    }

    #[test]
    fn one_net_change_per_id_and_time() {
        let rounds = vec![(
            5,
            vec![
                event("d-1", DeliveryStatus::Created, 1),
                event("d-1", DeliveryStatus::Waiting, 2),
                event("d-1", DeliveryStatus::Waiting, 1),
            ],
        )];
        let (out, _, counters) = run(100, vec![], rounds);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].0 .1.status, out[0].1, out[0].2),
            (DeliveryStatus::Waiting, 5, 1)
        );
        assert_eq!(counters.stale.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tombstones_absorb_late_events_then_expire() {
        let rounds = vec![
            (10, vec![event("d-1", DeliveryStatus::Created, 1)]),
            (20, vec![event("d-1", DeliveryStatus::Delivered, 2)]),
            (50, vec![event("d-1", DeliveryStatus::Waiting, 3)]), // within the ttl: ignored
            (200, vec![event("d-2", DeliveryStatus::Created, 4)]), // past the ttl: d-1's tombstone goes
        ];
        let (out, len, counters) = run(100, vec![], rounds);
        let d1: Vec<_> = out
            .iter()
            .filter(|((id, _), _, _)| id == "d-1")
            .map(|(_, t, r)| (*t, *r))
            .collect();
        assert_eq!(d1, [(10, 1), (20, -1)]);
        assert_eq!(counters.after_terminal.load(Ordering::Relaxed), 1);
        assert_eq!(counters.expired.load(Ordering::Relaxed), 1);
        assert_eq!(len, 1, "only d-2 is left in memory");
    }

    #[test]
    fn seeded_state_shows_at_the_first_time() {
        let row = bare_row(DeliveryStatus::Waiting, 7);
        let seed = vec![
            ("d-9".into(), DeliveryState::Live(row.clone())),
            ("d-8".into(), DeliveryState::Ended { ts: 3 }),
        ];
        let (out, _, _) = run(
            100,
            seed,
            vec![(10, vec![event("d-9", DeliveryStatus::Created, 6)])],
        );
        assert_eq!(
            out,
            vec![(("d-9".into(), row), 0, 1)],
            "the stale event changes nothing"
        );
    }

    /// A delivery upsert without seeds over `st`, asked for checkpoints through `slot`.
    fn checkpointed_upsert<'s>(
        scope: timely::dataflow::Scope<'s, Time>,
        st: Rc<RefCell<UpsertState<DeliveryRule>>>,
        slot: Rc<SnapshotSlot<DeliveryState>>,
    ) -> (EventInput, timely::dataflow::ProbeHandle<Time>) {
        let (input, stream) = scope.new_input::<Enriched<DeliveryEvent>>();
        let no_seeds = timely::dataflow::operators::generic::operator::empty(scope);
        let no_side = timely::dataflow::operators::generic::operator::empty(scope);
        let counters = Arc::default();
        let out = upsert::<DeliveryRule>(stream, no_seeds, no_side, "Upsert", st, counters, slot);
        let (probe, _) = out.probe();
        (input, probe)
    }

    #[test]
    fn a_snapshot_holds_exactly_the_times_up_to_its_own() {
        let snapshot = timely::execute_directly(|worker| {
            let st = UpsertState::shared(1_000);
            let slot: Rc<SnapshotSlot<DeliveryState>> = Rc::default();
            slot.requested.set(Some(2));
            let (mut input, probe) =
                worker.dataflow(|scope| checkpointed_upsert(scope, st.clone(), slot.clone()));
            // Three times arrive before the operator runs at all: the cut must fall between 2 and 3.
            input.advance_to(1);
            input.send(event("d-1", DeliveryStatus::Created, 10));
            input.advance_to(2);
            input.send(event("d-2", DeliveryStatus::Created, 11));
            input.advance_to(3);
            input.send(event("d-1", DeliveryStatus::Delivered, 12));
            input.send(event("d-3", DeliveryStatus::Created, 13));
            input.advance_to(4);
            worker.step_while(|| probe.less_than(&4));
            let taken = slot.taken.borrow_mut().take();
            taken.expect("the snapshot was taken").0
        });
        assert_eq!(snapshot.time, 2);
        let mut ids: Vec<(String, bool)> = snapshot
            .entries
            .iter()
            .map(|(id, s)| (id.to_string(), DeliveryRule::is_tombstone(s)))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            [("d-1".to_string(), false), ("d-2".to_string(), false)]
        );
        assert!(snapshot.expiry.is_empty());

        // Shares of seeds: together every id once.
        let mut shared: Vec<Id> = (0..3)
            .flat_map(|part| snapshot.seeds(part, 3).map(|s| s.id().clone()))
            .collect();
        shared.sort();
        assert_eq!(shared, ["d-1".into(), "d-2".into()] as [Id; 2]);
    }

    /// A snapshot larger than a copy step is copied over several activations while later times
    /// change, end and add deliveries: it holds the state at its time all the same.
    #[test]
    fn a_snapshot_copied_in_steps_holds_its_time_whatever_changes_meanwhile() {
        let n = 5 * COPY_STEP;
        let (snapshot, rounds, later) = timely::execute_directly(move |worker| {
            let st = UpsertState::shared(1_000);
            let slot: Rc<SnapshotSlot<DeliveryState>> = Rc::default();
            let (mut input, probe) =
                worker.dataflow(|scope| checkpointed_upsert(scope, st.clone(), slot.clone()));
            input.advance_to(1);
            for i in 0..n {
                input.send(event(&format!("d-{i}"), DeliveryStatus::Created, 10));
            }
            input.advance_to(2);
            worker.step_while(|| probe.less_than(&2));
            slot.requested.set(Some(1));
            let mut rounds = 0;
            while slot.taken.borrow().is_none() && rounds < 1_000 {
                // Each round a later time ends some ids, changes others and adds a new one.
                for i in (rounds * 97..n).step_by(n / 7).take(7) {
                    let status = match i % 2 {
                        0 => DeliveryStatus::Cancelled,
                        _ => DeliveryStatus::Waiting,
                    };
                    input.send(event(&format!("d-{i}"), status, 11));
                }
                input.send(event(&format!("new-{rounds}"), DeliveryStatus::Created, 11));
                input.advance_to(3 + rounds as Time);
                worker.step();
                rounds += 1;
            }
            input.close();
            worker.step_while(|| !probe.done());
            let later = st.borrow().len();
            let taken = slot.taken.borrow_mut().take();
            (taken.expect("the snapshot was taken").0, rounds, later)
        });
        assert!(rounds > 2, "copied over {rounds} rounds");
        assert_eq!(snapshot.time, 1);
        assert!(snapshot.expiry.is_empty(), "nothing had ended at time 1");
        let held: BTreeMap<String, DeliveryState> = snapshot
            .entries
            .iter()
            .map(|(id, s)| (id.to_string(), s.clone()))
            .collect();
        let wrong: Vec<_> = (0..n)
            .map(|i| format!("d-{i}"))
            .filter(|id| {
                !matches!(held.get(id), Some(DeliveryState::Live(row)) if row.status == DeliveryStatus::Created)
            })
            .take(5)
            .collect();
        assert!(wrong.is_empty(), "not as at time 1: {wrong:?}");
        assert_eq!(held.len(), n, "only the ids of time 1");
        assert!(
            later > n,
            "the later times were applied meanwhile: {later} ids"
        );
    }

    #[test]
    fn seeds_reach_the_worker_that_owns_them_whatever_the_worker_count() {
        // A checkpoint written by some other number of workers: 100 live ids and 20 tombstones.
        let snapshot = StateSnapshot {
            time: 7,
            entries: (0..100)
                .map(|i| {
                    let id: Id = format!("d-{i}").into();
                    (
                        id,
                        DeliveryState::Live(bare_row(DeliveryStatus::Created, 1)),
                    )
                })
                .collect(),
            expiry: (0..20).map(|i| (50, format!("e-{i}").into())).collect(),
            ..StateSnapshot::default()
        };
        let snapshot = Arc::new(snapshot);
        let config = timely::Config::process(3);
        let per_worker = timely::execute(config, move |worker| {
            let st = UpsertState::<DeliveryRule>::shared(1_000);
            let (mut input, mut seeds, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, seeds, out) = delivery_upsert(scope, st.clone(), Arc::default());
                let (probe, _) = out.probe();
                (input, seeds, probe)
            });
            seeds.advance_to(7);
            for seed in snapshot.seeds(worker.index(), worker.peers()) {
                seeds.send(seed);
            }
            seeds.close();
            // An event after the seeds for an id seeded live, and one for a seeded tombstone.
            input.advance_to(8);
            if worker.index() == 0 {
                input.send(event("d-3", DeliveryStatus::Cancelled, 2));
                input.send(event("e-4", DeliveryStatus::Created, 2));
            }
            input.close();
            worker.step_while(|| !probe.done());
            let st = st.borrow();
            let mut held: Vec<(Id, bool)> = st.iter().map(|(id, _)| (id.clone(), false)).collect();
            held.extend(st.tombstone_expiry().map(|(_, id)| (id.clone(), true)));
            for (id, _) in &held {
                assert_eq!(
                    owner(id, worker.peers()),
                    worker.index(),
                    "{id} on its owner"
                );
            }
            held
        })
        .expect("timely")
        .join()
        .into_iter()
        .map(|r| r.expect("worker"))
        .collect::<Vec<_>>();
        let mut all: Vec<(Id, bool)> = per_worker.into_iter().flatten().collect();
        all.sort();
        let (ended, live): (Vec<_>, Vec<_>) = all.iter().partition(|(_, ended)| *ended);
        // d-3 ended after its seed; e-4's late event did not bring it back.
        assert_eq!((live.len(), ended.len()), (99, 21));
        assert!(ended.iter().any(|(id, _)| id.as_str() == "d-3"));
        assert!(!live.iter().any(|(id, _)| id.as_str() == "e-4"));
    }

    #[test]
    fn tombstones_are_held_apart_and_restore_from_either_layout() {
        let mut state = UpsertState::<DeliveryRule>::new(100);
        let mut touched = Vec::new();
        let counters = UpsertCounters::default();
        let rounds = [
            event("d-1", DeliveryStatus::Created, 1),
            event("d-1", DeliveryStatus::Delivered, 2),
            event("d-2", DeliveryStatus::Cancelled, 3),
            event("d-3", DeliveryStatus::Created, 4),
        ];
        apply_time::<DeliveryRule>(
            &mut state,
            5,
            vec![rounds.to_vec()],
            &mut touched,
            &counters,
        );
        assert_eq!((state.len(), state.tombstones()), (3, 2));
        assert!(state.get(&"d-1".into()).is_none() && state.is_ended(&"d-1".into()));
        let snapshot = state.snapshot(5);
        assert_eq!(
            snapshot.entries.len(),
            1,
            "only the live delivery is listed"
        );
        let mut expiry = snapshot.expiry.clone();
        expiry.sort();
        assert_eq!(expiry, [(105, "d-1".into()), (105, "d-2".into())]);

        // An earlier layout lists the tombstones among the entries too: they stay tombstones.
        let mut earlier = snapshot.clone();
        earlier
            .entries
            .push(("d-1".into(), DeliveryState::Ended { ts: 2 }));
        for from in [snapshot, earlier] {
            let mut restored = UpsertState::<DeliveryRule>::new(100);
            restored.restore(vec![from.seeds(0, 1).collect()], &mut touched);
            assert_eq!((restored.len(), restored.tombstones()), (3, 2));
            assert!(restored.is_ended(&"d-1".into()) && restored.get(&"d-1".into()).is_none());
            // A late event for a restored tombstone is absorbed, then the ttl forgets it.
            let late = vec![vec![event("d-1", DeliveryStatus::Waiting, 9)]];
            apply_time::<DeliveryRule>(&mut restored, 50, late, &mut touched, &counters);
            assert!(restored.get(&"d-1".into()).is_none());
            apply_time::<DeliveryRule>(&mut restored, 105, vec![], &mut touched, &counters);
            assert_eq!((restored.len(), restored.tombstones()), (1, 0));
        }
        assert_eq!(counters.after_terminal.load(Ordering::Relaxed), 2);
    }

    mod idle {
        use super::*;
        use crate::stages::RiderRule;
        use crate::types::RiderRow;
        use dongflow_records::{Coord, RiderEvent, RiderStatus};
        use rand::{Rng, SeedableRng};
        use std::collections::HashMap;

        fn ping(id: &str, status: RiderStatus, ts: u64, at: Option<u16>) -> Enriched<RiderEvent> {
            Enriched {
                event: RiderEvent {
                    rider_id: id.into(),
                    status,
                    rider_type: at.map(|_| "CONNECT".into()),
                    location: at.map(|d| Coord {
                        lat: 37.5,
                        lon: 127.0 + f64::from(d) / 100.0,
                    }),
                    ts,
                },
                district: at,
            }
        }

        fn riders(ttl: Time) -> UpsertState<RiderRule> {
            let mut state = UpsertState::new(1_000);
            state.forget_idle_after(Some(ttl));
            state
        }

        fn apply(
            state: &mut UpsertState<RiderRule>,
            time: Time,
            events: Vec<Enriched<RiderEvent>>,
        ) -> Arc<UpsertCounters> {
            let counters = Arc::new(UpsertCounters::default());
            apply_time::<RiderRule>(state, time, vec![events], &mut Vec::new(), &counters);
            counters
        }

        /// Applies one ping at `time`.
        fn apply_one(
            state: &mut UpsertState<RiderRule>,
            time: Time,
            id: &str,
            status: RiderStatus,
            ts: u64,
            at: Option<u16>,
        ) -> Arc<UpsertCounters> {
            apply(state, time, vec![ping(id, status, ts, at)])
        }

        #[test]
        fn a_rider_off_shift_is_forgotten_after_its_ttl_and_its_late_pings_stay_stale() {
            let mut st = riders(100);
            apply_one(&mut st, 10, "r-1", RiderStatus::ShiftStarted, 1, Some(3));
            apply_one(&mut st, 20, "r-1", RiderStatus::ShiftEnded, 2, None);
            // Unchanged for less than the ttl: remembered with its type and location.
            apply(&mut st, 119, vec![]);
            assert_eq!(st.get(&"r-1".into()).map(|r| r.rider.district), Some(3));
            let counters = apply(&mut st, 120, vec![]);
            assert!(st.get(&"r-1".into()).is_none(), "forgotten at 20 + 100");
            assert_eq!(counters.forgotten.load(Ordering::Relaxed), 1);
            // A late ping of the forgotten rider is stale, as it was while the rider was held;
            // so is any event of an id not held that is older than the forgotten rider's last.
            let counters = apply(
                &mut st,
                130,
                vec![
                    ping("r-1", RiderStatus::OnShift, 1, Some(4)),
                    ping("r-2", RiderStatus::OnShift, 1, Some(4)),
                ],
            );
            assert_eq!(counters.stale.load(Ordering::Relaxed), 2);
            assert!(st.get(&"r-1".into()).is_none() && st.get(&"r-2".into()).is_none());
            // An equal ts applies, as it would have for the held rider; a next shift starts anew.
            apply_one(&mut st, 140, "r-1", RiderStatus::ShiftStarted, 2, None);
            let row = &st.get(&"r-1".into()).expect("on shift again").rider;
            assert_eq!(
                (row.district, row.location.get(), row.rider_type.clone()),
                (crate::districts::UNASSIGNED, None, None)
            );
        }

        #[test]
        fn a_rider_back_on_shift_or_ahead_of_the_clock_is_not_forgotten() {
            let mut st = riders(100);
            apply_one(&mut st, 10, "r-1", RiderStatus::ShiftEnded, 1, Some(3));
            apply_one(&mut st, 50, "r-1", RiderStatus::ShiftStarted, 2, None);
            // Its ts is after the dataflow's time: kept until the clock has passed it.
            apply_one(&mut st, 60, "r-9", RiderStatus::ShiftEnded, 500, Some(1));
            apply(&mut st, 200, vec![]);
            assert!(st.get(&"r-1".into()).is_some(), "on shift since 50");
            assert!(
                st.get(&"r-9".into()).is_some(),
                "ts 500 is ahead of time 200"
            );
            apply(&mut st, 600, vec![]);
            assert!(st.get(&"r-9".into()).is_none());
            assert_eq!(st.idle().forgotten_through, 500);
        }

        /// A seed of a rider the upsert already holds (never at a start, where seeds come first)
        /// replaces its row and keeps the deliveries the side input gave it.
        #[test]
        fn a_seeded_rider_keeps_the_deliveries_the_side_input_gave_it() {
            let mut st = riders(100);
            apply_one(&mut st, 10, "r-1", RiderStatus::ShiftStarted, 1, Some(3));
            let brief = crate::types::DeliveryBrief {
                delivery_id: "d-1".into(),
                status: DeliveryStatus::Assigned,
                vehicle: None,
                ts: 1,
            };
            let side = vec![(("r-1".into(), brief.clone()), 1)];
            apply_sides::<RiderRule>(&mut st, 10, side, &mut Vec::new());
            let row = st.get(&"r-1".into()).expect("held").rider.clone();
            let seeds = vec![vec![Seed::Live("r-1".into(), RiderRow { ts: 5, ..row })]];
            st.restore(seeds, &mut Vec::new());
            let held = st.get(&"r-1".into()).expect("held");
            assert_eq!((held.rider.ts, held.deliveries.to_vec()), (5, vec![brief]));
            assert!(st.extra().is_empty());
        }

        #[test]
        fn a_checkpoint_keeps_when_each_rider_became_idle_and_the_horizon() {
            let mut st = riders(100);
            apply_one(&mut st, 10, "r-1", RiderStatus::ShiftEnded, 1, Some(3));
            apply_one(&mut st, 20, "r-2", RiderStatus::ShiftEnded, 2, Some(3));
            apply_one(&mut st, 25, "r-2", RiderStatus::ShiftEnded, 3, Some(4));
            apply_one(&mut st, 30, "r-3", RiderStatus::ShiftEnded, 1, Some(3));
            apply(&mut st, 115, vec![]);
            let snapshot = st.snapshot(115);
            assert_eq!(snapshot.forgotten_through, 1, "r-1 forgotten at 110");
            let mut idle = snapshot.idle.clone();
            idle.sort();
            assert_eq!(
                idle,
                [(25, "r-2".into()), (30, "r-3".into())],
                "r-2 once, at its latest"
            );
            // Restored on two workers' worth of shares, in any order: each rider forgotten
            // `ttl` after it became idle, not after the restore.
            let mut restored = riders(100);
            restored.set_forgotten_through(snapshot.forgotten_through);
            let seeds = vec![
                snapshot.seeds(1, 2).collect(),
                snapshot.seeds(0, 2).collect(),
            ];
            restored.restore(seeds, &mut Vec::new());
            apply(&mut restored, 124, vec![]);
            assert!(restored.get(&"r-2".into()).is_some());
            apply(&mut restored, 125, vec![]);
            assert!(restored.get(&"r-2".into()).is_none() && restored.get(&"r-3".into()).is_some());
            apply(&mut restored, 130, vec![]);
            assert!(restored.get(&"r-3".into()).is_none());
            let counters = apply_one(&mut restored, 131, "r-1", RiderStatus::OnShift, 0, Some(1));
            assert_eq!(
                counters.stale.load(Ordering::Relaxed),
                1,
                "r-1's horizon came along"
            );
        }

        /// Against a plain map over random sequences (stale, duplicate, out of order, ends,
        /// restarts of shifts, quiet stretches), every event's `ts` at or before its time.
        #[test]
        fn agrees_with_a_map() {
            #[derive(Clone)]
            struct Held {
                row: RiderRow,
                changed: Time,
            }
            let ttl = 40;
            let (mut forgotten, mut refused) = (0, 0);
            for seed in 0..40 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut st = riders(ttl);
                let mut model: HashMap<Id, Held> = HashMap::new();
                let mut horizon = 0;
                let mut time: Time = 0;
                for _ in 0..300 {
                    time += rng.random_range(1..15);
                    let events: Vec<_> = (0..rng.random_range(0..4))
                        .map(|_| {
                            let id = format!("r-{}", rng.random_range(0..8));
                            let status = match rng.random_range(0..3) {
                                0 => RiderStatus::ShiftStarted,
                                1 => RiderStatus::OnShift,
                                _ => RiderStatus::ShiftEnded,
                            };
                            let ts = time.saturating_sub(rng.random_range(0..60));
                            let at = rng.random_bool(0.5).then(|| rng.random_range(0..5));
                            ping(&id, status, ts, at)
                        })
                        .collect();
                    // The model: forget first, then apply in order.
                    model.retain(|_, held| {
                        let forget = !held.row.status.on_shift()
                            && held.changed + ttl <= time
                            && held.row.ts <= time;
                        if forget {
                            horizon = horizon.max(held.row.ts);
                            forgotten += 1;
                        }
                        !forget
                    });
                    for e in &events {
                        let id = &e.event.rider_id;
                        let current = model.get(id).map(|h| &h.row);
                        if current.is_none() && e.event.ts < horizon {
                            refused += 1;
                            continue;
                        }
                        if let Ok(row) = RiderRule::apply_row(current, e.clone()) {
                            model.insert(id.clone(), Held { row, changed: time });
                        }
                    }
                    apply(&mut st, time, events);
                    let mut held: Vec<(Id, RiderRow)> = st
                        .iter()
                        .map(|(id, s)| (id.clone(), s.rider.clone()))
                        .collect();
                    let mut expected: Vec<(Id, RiderRow)> = model
                        .iter()
                        .map(|(id, h)| (id.clone(), h.row.clone()))
                        .collect();
                    held.sort_by(|a, b| a.0.cmp(&b.0));
                    expected.sort_by(|a, b| a.0.cmp(&b.0));
                    assert_eq!(held, expected, "seed {seed}, time {time}");
                    assert_eq!(
                        st.idle().forgotten_through,
                        horizon,
                        "seed {seed}, time {time}"
                    );
                }
            }
            // The sequences did forget riders and refuse late events of ids not held.
            assert!(
                forgotten > 100 && refused > 20,
                "{forgotten} forgotten, {refused} refused"
            );
        }
    }
}
