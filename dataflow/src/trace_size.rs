//! How many updates an arrangement's trace holds: what compaction keeps bounded, shown in
//! `/metrics`. (Answers come from the serving view, never from reading the traces.)

use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::TraceReader;

use crate::types::{Diff, Time};

type Trace<K, V> = TraceAgent<ValSpine<K, V, Time, Diff>>;

/// The number of updates a trace holds (every batch, merged or not).
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
