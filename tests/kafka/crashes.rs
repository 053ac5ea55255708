//! Stale answers through crashes (CONTRACT section 7): kill -9 at chosen and random moments while
//! events arrive, asking the HTTP API from every spawn; each answer while `/readyz` is 503 says
//! `stale: true` and holds, key by key, what the changelog topics held at some moment of the last 3 s
//! (never less than they held at the spawn); after ready, `stale: false`; the end equals the model.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::*;

/// Every value each changelog key had, with when the test's reader saw it (`None`: no value).
#[derive(Default)]
struct History {
    districts: BTreeMap<String, Vec<(Instant, Option<Value>)>>,
    riders: BTreeMap<String, Vec<(Instant, Option<Value>)>>,
    /// The offset after the last record read, per (topic, partition).
    read_to: BTreeMap<(String, i32), i64>,
}

impl History {
    /// The values `key` had at some moment of `[from, to]`, the one in effect at `from` included.
    fn values_between(
        versions: Option<&Vec<(Instant, Option<Value>)>>,
        from: Instant,
        to: Instant,
    ) -> Vec<Option<Value>> {
        let versions = versions.map(Vec::as_slice).unwrap_or_default();
        let at_from = versions
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .and_then(|(_, v)| v.clone());
        let mut values = vec![at_from];
        values.extend(
            versions
                .iter()
                .filter(|(t, _)| *t > from && *t <= to)
                .map(|(_, v)| v.clone()),
        );
        values
    }
}

/// The end offset of every changelog partition.
fn changelog_ends(bootstrap: &str, t: &Topics) -> Vec<(String, i32, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    let mut ends = Vec::new();
    for topic in [&t.districts, &t.snapshots] {
        for p in 0..PARTITIONS {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            ends.push((topic.clone(), p, high));
        }
    }
    ends
}

/// A changelog value as an answer shows it: without `as_of`.
fn shown(value: &[u8]) -> Value {
    let mut v: Value = serde_json::from_slice(value).expect("changelog values are JSON");
    if let Some(o) = v.as_object_mut() {
        o.remove("as_of");
    }
    v
}

/// Reads both changelog topics for as long as `running`, noting every key's versions.
fn watch_changelog(
    bootstrap: &str,
    t: &Topics,
    history: Arc<Mutex<History>>,
    running: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut districts = Reader::new(bootstrap, &t.districts, PARTITIONS);
    let mut riders = Reader::new(bootstrap, &t.snapshots, PARTITIONS);
    std::thread::spawn(move || {
        while running.load(Ordering::Acquire) {
            let (seen_d, seen_r) = (districts.records.len(), riders.records.len());
            districts.poll(Duration::from_millis(20));
            riders.poll(Duration::from_millis(20));
            let now = Instant::now();
            let mut guard = history.lock().unwrap_or_else(|e| e.into_inner());
            let h = &mut *guard;
            for (records, seen, map) in [
                (&districts.records, seen_d, &mut h.districts),
                (&riders.records, seen_r, &mut h.riders),
            ] {
                for r in &records[seen..] {
                    let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default());
                    let value = r.value.as_deref().map(shown);
                    map.entry(key.into_owned()).or_default().push((now, value));
                }
            }
            for r in districts.records[seen_d..]
                .iter()
                .chain(&riders.records[seen_r..])
            {
                let to = h.read_to.entry((r.topic.clone(), r.partition)).or_default();
                *to = (*to).max(r.offset + 1);
            }
        }
    })
}

/// When a run is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after the spawn.
    AfterSpawn(Duration),
    /// This long after `/readyz` first said 200.
    AfterReady(Duration),
    /// Once it has answered stale (or is ready, if the changelog held nothing to answer from).
    AfterFirstStale,
    /// Never: the last run goes to the end.
    Never,
}

/// One answer, with when it was asked and received.
struct Asked {
    path: String,
    sent: Instant,
    received: Instant,
    status: u16,
    body: Value,
}

/// Asks `/readyz`, `/v1/districts` and a few riders the changelog holds (and one it never does)
/// until the kill moment (or ready, for the last run); returns the answers given while not ready.
fn ask_until_killed(
    run: Dongflow,
    kill: Kill,
    history: &Arc<Mutex<History>>,
    rng: &mut rand::rngs::SmallRng,
) -> (Vec<Asked>, Option<Dongflow>) {
    use rand::seq::IndexedRandom;
    let spawned = Instant::now();
    let client = common::Client::at(run.http.clone());
    let mut stale = Vec::new();
    let mut ready_at: Option<Instant> = None;
    let deadline = spawned + Duration::from_secs(120);
    loop {
        let due = match kill {
            Kill::AfterSpawn(d) => spawned.elapsed() >= d,
            Kill::AfterReady(d) => ready_at.is_some_and(|r| r.elapsed() >= d),
            Kill::AfterFirstStale => !stale.is_empty() || ready_at.is_some(),
            Kill::Never => ready_at.is_some(),
        };
        if due {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kill:?} never came: {}",
            run.log()
        );
        let (ready, _) = client.json("/readyz");
        let mut paths = vec!["/v1/districts".to_owned(), "/v1/riders/r-never".to_owned()];
        let known: Vec<String> = {
            let h = history.lock().unwrap_or_else(|e| e.into_inner());
            h.riders.keys().cloned().collect()
        };
        paths.extend(
            known
                .choose_multiple(rng, 3)
                .map(|id| format!("/v1/riders/{id}")),
        );
        for path in paths {
            let sent = Instant::now();
            let (status, body) = client.json(&path);
            let received = Instant::now();
            if body["stale"] == Value::Bool(true) {
                stale.push(Asked {
                    path,
                    sent,
                    received,
                    status,
                    body,
                });
            } else if status != 503 {
                // `stale: false` (or a plain 404): only once ready, which never goes back.
                assert_eq!(
                    client.json("/readyz").0,
                    200,
                    "{path} answered {status} {body} before /readyz said 200"
                );
            }
        }
        if ready == 200 && ready_at.is_none() {
            ready_at = Some(Instant::now());
            // After ready, live.
            let (status, body) = client.json("/v1/districts");
            assert_eq!((status, &body["stale"]), (200, &Value::Bool(false)));
        }
    }
    match kill {
        Kill::Never => (stale, Some(run)),
        _ => {
            drop(run); // SIGKILL
            (stale, None)
        }
    }
}

/// Checks one stale answer against the changelog's history: every key as it was at some moment
/// between 3 s before it was asked (not before the spawn) and 1 s after it came (the test's reader
/// sees records a little after the broker has them).
fn check_stale(asked: &Asked, spawned: Instant, history: &History) {
    let from = asked
        .sent
        .checked_sub(Duration::from_secs(3))
        .unwrap_or(spawned)
        .max(spawned);
    let to = asked.received + Duration::from_secs(1);
    if asked.path == "/v1/districts" {
        assert_eq!(asked.status, 200, "{}", asked.body);
        let answered = by_code(&asked.body["districts"]);
        let keys: BTreeSet<&String> = answered.keys().chain(history.districts.keys()).collect();
        for code in keys {
            let allowed = History::values_between(history.districts.get(code), from, to);
            let got = answered.get(code).cloned();
            assert!(
                allowed.contains(&got),
                "district {code}: answered {got:?}, the changelog held {allowed:?} meanwhile"
            );
        }
        return;
    }
    let id = asked.path.trim_start_matches("/v1/riders/");
    let got = match asked.status {
        200 => {
            let mut body = asked.body.clone();
            let o = body.as_object_mut().expect("object");
            o.remove("as_of");
            o.remove("stale");
            Some(body)
        }
        404 => None,
        other => panic!("{}: {other} {}", asked.path, asked.body),
    };
    let allowed = History::values_between(history.riders.get(id), from, to);
    assert!(
        allowed.contains(&got),
        "rider {id}: answered {got:?}, the changelog held {allowed:?} meanwhile"
    );
}

#[test]
fn stale_answers_through_crashes_hold_what_the_changelog_held() {
    use rand::{Rng, SeedableRng};
    let Some(broker) = Broker::tansu() else {
        return;
    };
    let index = builtin();
    let t = Topics::new("stalecrash");
    let input = scenario(&t, &index, 47, 8_000);
    broker.create(
        &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
        PARTITIONS,
    );
    let bootstrap = broker.bootstrap();
    let state = state_dir("stalecrash");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(53);

    // Events arrive all along: a chunk every 250 ms.
    let producing = {
        let (bootstrap, records) = (bootstrap.clone(), input.records.clone());
        std::thread::spawn(move || {
            for chunk in records.chunks(200) {
                produce(&bootstrap, chunk);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let history = Arc::new(Mutex::new(History::default()));
    let running = Arc::new(AtomicBool::new(true));
    let mut kills = vec![
        // Within the first checkpoint interval (checkpoints every 2 s).
        Kill::AfterReady(Duration::from_millis(300)),
        // Past a checkpoint or two, with a changelog to answer from.
        Kill::AfterReady(Duration::from_millis(2_500)),
        // Right after a restart.
        Kill::AfterSpawn(Duration::from_millis(150)),
        Kill::AfterFirstStale,
    ];
    for _ in 0..2 {
        kills.push(match rng.random_bool(0.5) {
            true => Kill::AfterSpawn(Duration::from_millis(rng.random_range(200..3_000))),
            false => Kill::AfterReady(Duration::from_millis(rng.random_range(0..3_000))),
        });
    }
    kills.push(Kill::Never);
    let watcher = watch_changelog(&bootstrap, &t, history.clone(), running.clone());
    let mut stale_answers = 0;
    let mut last = None;
    for (round, kill) in kills.iter().enumerate() {
        let workers = if round % 2 == 0 { "2" } else { "1" };
        let mut args = t.resume_args(&bootstrap, &state, workers);
        args.extend(["--checkpoint-interval", "2s"]);
        let spawned = Instant::now();
        let run = Dongflow::run(&args);
        let (asked, run) = ask_until_killed(run, *kill, &history, &mut rng);
        // The reader must have seen what the run wrote before what it answered is checked.
        let ends = changelog_ends(&bootstrap, &t);
        eventually(
            Duration::from_secs(60),
            "the changelog read to its end",
            || {
                let h = history.lock().unwrap_or_else(|e| e.into_inner());
                ends.iter()
                    .all(|(topic, p, end)| {
                        *end == 0
                            || h.read_to
                                .get(&(topic.clone(), *p))
                                .is_some_and(|to| to >= end)
                    })
                    .then_some(())
            },
        );
        let h = history.lock().unwrap_or_else(|e| e.into_inner());
        for a in &asked {
            check_stale(a, spawned, &h);
        }
        stale_answers += asked.len();
        let first = asked.first().map(|a| a.received - spawned);
        eprintln!(
            "round {round} ({kill:?}): {} stale answers, the first after {first:?}",
            asked.len()
        );
        last = run;
    }
    producing.join().expect("producer");
    let run = last.expect("the last run");
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    check_http_equals_model(&run.http, &input);
    assert_eq!(run.terminate(), Some(0));
    running.store(false, Ordering::Release);
    watcher.join().expect("watcher");
    assert!(stale_answers > 0, "no restart answered stale");
}
