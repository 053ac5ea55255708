//! Reading arrangements at one time: the worker side of a query.
//!
//! A trace is read at `as_of` by accumulating every update at a time less than or equal to it. This
//! is exact as long as the trace's logical compaction frontier is not beyond `as_of` (the worker loop
//! holds it back for queries in flight) and `as_of` is complete (the probe has passed it).

use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::cursor::{cursor_list, Cursor};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::TraceReader;
use timely::progress::frontier::AntichainRef;

use crate::types::{Diff, Time};

type Trace<K, V> = TraceAgent<ValSpine<K, V, Time, Diff>>;

/// Visits every value of `key` (or of every key, with `None`) present at `as_of`, with its multiplicity.
fn visit<K, V, F>(trace: &mut Trace<K, V>, key: Option<&K>, as_of: Time, mut f: F)
where
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
    F: FnMut(&K, &V, Diff),
{
    // The empty frontier asks for every batch, including those beyond `as_of`, which are skipped below.
    let Some(batches) = trace.batches_through(AntichainRef::new(&[])) else {
        return;
    };
    let (mut cursor, storage) = cursor_list(batches);
    if let Some(key) = key {
        cursor.seek_key(&storage, key);
    }
    while let Some(k) = cursor.get_key(&storage) {
        if key.is_some_and(|wanted| wanted != k) {
            break;
        }
        while let Some(v) = cursor.get_val(&storage) {
            let mut sum: Diff = 0;
            cursor.map_times(&storage, |t, d| {
                if *t <= as_of {
                    sum += *d;
                }
            });
            if sum != 0 {
                f(k, v, sum);
            }
            cursor.step_val(&storage);
        }
        cursor.step_key(&storage);
    }
}

/// The values of `key` at `as_of` (each value once per unit of multiplicity).
///
/// ```
/// use differential_dataflow::input::Input;
/// use dongflow_dataflow::peek::read_key;
/// use timely::dataflow::operators::Probe;
///
/// timely::execute_directly(|worker| {
///     let (mut input, mut trace, probe) = worker.dataflow::<u64, _, _>(|scope| {
///         let (input, data) = scope.new_collection::<(u32, String), isize>();
///         let arranged = data.arrange_by_key();
///         let (probe, _) = arranged.stream.clone().probe();
///         (input, arranged.trace, probe)
///     });
///     input.insert((1, "one".to_string()));
///     input.advance_to(5);
///     input.remove((1, "one".to_string()));
///     input.insert((1, "uno".to_string()));
///     input.advance_to(6);
///     input.flush();
///     worker.step_while(|| probe.less_than(&6));
///     assert_eq!(read_key(&mut trace, &1, 4), vec!["one".to_string()]);
///     assert_eq!(read_key(&mut trace, &1, 5), vec!["uno".to_string()]);
/// });
/// ```
pub fn read_key<K, V>(trace: &mut Trace<K, V>, key: &K, as_of: Time) -> Vec<V>
where
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
{
    let mut out = Vec::new();
    visit(trace, Some(key), as_of, |_, v, n| {
        out.extend(std::iter::repeat_n(v.clone(), n.max(0) as usize))
    });
    out
}

/// Every (key, value) at `as_of`, sorted by key (each pair once per unit of multiplicity).
///
/// ```
/// use differential_dataflow::input::Input;
/// use dongflow_dataflow::peek::{read_all, read_keys, trace_len};
/// use timely::dataflow::operators::Probe;
///
/// timely::execute_directly(|worker| {
///     let (mut input, mut trace, probe) = worker.dataflow::<u64, _, _>(|scope| {
///         let (input, data) = scope.new_collection::<(u32, char), isize>();
///         let arranged = data.arrange_by_key();
///         let (probe, _) = arranged.stream.clone().probe();
///         (input, arranged.trace, probe)
///     });
///     for (k, v) in [(3, 'c'), (1, 'a'), (2, 'b')] {
///         input.insert((k, v));
///     }
///     input.advance_to(1);
///     input.flush();
///     worker.step_while(|| probe.less_than(&1));
///     assert_eq!(read_all(&mut trace, 0), vec![(1, 'a'), (2, 'b'), (3, 'c')]);
///     assert_eq!(read_keys(&mut trace, &[3, 1, 9], 0), vec![(1, 'a'), (3, 'c')]);
///     assert_eq!(trace_len(&trace), 3);
/// });
/// ```
pub fn read_all<K, V>(trace: &mut Trace<K, V>, as_of: Time) -> Vec<(K, V)>
where
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
{
    let mut out = Vec::new();
    visit(trace, None, as_of, |k, v, n| {
        out.extend(std::iter::repeat_n(
            (k.clone(), v.clone()),
            n.max(0) as usize,
        ));
    });
    out
}

/// The values of several keys at `as_of`, as (key, value) pairs in key order (see [`read_all`]).
pub fn read_keys<K, V>(trace: &mut Trace<K, V>, keys: &[K], as_of: Time) -> Vec<(K, V)>
where
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
{
    let mut keys: Vec<&K> = keys.iter().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .flat_map(|k| {
            read_key(trace, k, as_of)
                .into_iter()
                .map(move |v| (k.clone(), v))
        })
        .collect()
}

/// The number of updates a trace holds (every batch, merged or not): what compaction keeps bounded
/// (see [`read_all`]).
pub fn trace_len<K, V>(trace: &Trace<K, V>) -> usize
where
    K: Ord + Clone + 'static,
    V: Ord + Clone + 'static,
{
    use differential_dataflow::trace::implementations::spine_fueled::SpineBatch;
    let mut n = 0;
    trace.map_spans(|span| n += span.inner.as_ref().map_or(0, |b| b.len()));
    n
}
