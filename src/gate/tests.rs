use super::*;
use crate::metrics::Metrics;
use crate::store::WriterGuard;
use crate::store::sqlite::SqliteStore;
use tokio::task::JoinHandle;

fn t(value: u64) -> FencingToken {
    FencingToken::new(value)
}

fn key(name: &str) -> ResourceKey {
    ResourceKey::new(name)
}

struct Fixture {
    gate: Gate,
    _guard: WriterGuard,
    _dir: tempfile::TempDir,
}

/// Runs a test's body under a deadline: a gate that never lets a request through (a broken drain,
/// a slot that never loads) fails the test in seconds instead of hanging it. The deadline is real
/// time, kept by a thread of its own: a tokio timer would fire at once in the paused-time tests,
/// whose clock jumps ahead whenever they wait for the store's thread.
async fn within<F: std::future::Future>(body: F) -> F::Output {
    let (expired, deadline) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        let _ = expired.send(());
    });
    tokio::select! {
        output = body => output,
        _ = deadline => panic!("the gate never answered within 5 s: a request waits for ever"),
    }
}

fn fixture(in_doubt_grace: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, guard) = SqliteStore::open(&dir.path().join("gate.db")).unwrap();
    Fixture {
        gate: gate_on(store, in_doubt_grace),
        _guard: guard,
        _dir: dir,
    }
}

/// A gate on `store` after a clean stop, as a replica or a restart would open it.
fn gate_on(store: SharedStore, in_doubt_grace: Duration) -> Gate {
    Gate::new(store, in_doubt_grace, Metrics::new(), LastStop::Clean)
}

fn admit_later(gate: &Gate, resource: &str, token: u64) -> JoinHandle<Result<Permit, Refusal>> {
    let gate = gate.clone();
    let resource = key(resource);
    tokio::spawn(async move { gate.admit(&resource, t(token), None, "").await })
}

/// Waits (without assuming anything about timing) until `token` is the durable highest.
///
/// It waits in real time, never in the test's paused time: a tokio sleep would let paused time
/// run on while the store's thread is slow (a loaded machine), and a grace could pass unseen.
async fn until_highest(gate: &Gate, resource: &str, token: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if gate.highest(&key(resource)).await.unwrap() == Some(t(token)) {
            return;
        }
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("{resource} never reached {token}");
}

/// Gives every other task on this single-threaded runtime many chances to run.
async fn let_others_run() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn judge_compares_token_with_highest() {
    assert_eq!(judge(Some(t(5)), t(4)), Verdict::Stale { highest: t(5) });
    assert_eq!(judge(Some(t(5)), t(5)), Verdict::Current);
    assert_eq!(judge(Some(t(5)), t(6)), Verdict::Newer);
    assert_eq!(judge(None, t(0)), Verdict::Newer);
}

#[test]
fn jump_limit_applies_only_above_a_known_highest() {
    assert!(check_jump(Some(t(10)), t(110), Some(100)).is_ok());
    assert!(matches!(
        check_jump(Some(t(10)), t(111), Some(100)),
        Err(Refusal::Jump { highest, limit: 100 }) if highest == t(10)
    ));
    assert!(check_jump(None, t(u64::MAX), Some(100)).is_ok());
    assert!(check_jump(Some(t(0)), t(u64::MAX), None).is_ok());
}

#[tokio::test]
async fn same_token_requests_are_admitted_together() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let first = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let second = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let third = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        for permit in [first, second, third] {
            assert_eq!(permit.settle(), Some(t(1)));
        }
    })
    .await
}

#[tokio::test]
async fn lower_token_is_refused_once_a_higher_one_is_durable() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        f.gate
            .admit(&key("w"), t(2), None, "")
            .await
            .unwrap()
            .settle();
        let refusal = f.gate.admit(&key("w"), t(1), None, "").await.unwrap_err();
        assert!(matches!(refusal, Refusal::Stale { highest } if highest == t(2)));
    })
    .await
}

#[tokio::test]
async fn higher_token_waits_until_older_in_flight_requests_settle() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let new = admit_later(&f.gate, "w", 2);
        until_highest(&f.gate, "w", 2).await;
        let_others_run().await;
        assert!(
            !new.is_finished(),
            "token 2 must not be forwarded while token 1 is in flight"
        );

        old.settle();
        let permit = new.await.unwrap().unwrap();
        assert_eq!(permit.highest(), Some(t(2)));
    })
    .await
}

#[tokio::test]
async fn resources_do_not_wait_on_each_other() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let _busy = f.gate.admit(&key("a"), t(1), None, "").await.unwrap();
        let other = f.gate.admit(&key("b"), t(2), None, "").await.unwrap();
        other.settle();
    })
    .await
}

#[tokio::test]
async fn requests_arriving_with_a_new_token_all_go_once_the_old_drain() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let first = admit_later(&f.gate, "w", 2);
        until_highest(&f.gate, "w", 2).await;
        let second = admit_later(&f.gate, "w", 2);
        let_others_run().await;
        assert!(!first.is_finished() && !second.is_finished());

        old.settle();
        // Both permits are held at the same time: same-token requests never wait on each other.
        let first = first.await.unwrap().unwrap();
        let second = second.await.unwrap().unwrap();
        first.settle();
        second.settle();
    })
    .await
}

#[tokio::test]
async fn waiter_superseded_by_an_even_higher_token_is_refused() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let middle = admit_later(&f.gate, "w", 2);
        until_highest(&f.gate, "w", 2).await;
        let newest = admit_later(&f.gate, "w", 3);
        until_highest(&f.gate, "w", 3).await;

        let refusal = middle.await.unwrap().unwrap_err();
        assert!(matches!(refusal, Refusal::Stale { highest } if highest == t(3)));
        let_others_run().await;
        assert!(!newest.is_finished());
        old.settle();
        newest.await.unwrap().unwrap().settle();
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn torn_down_request_holds_back_the_next_token_for_the_grace() {
    within(async {
        let f = fixture(Duration::from_secs(10));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        drop(old); // torn down: the upstream may still apply it
        let new = admit_later(&f.gate, "w", 2);
        until_highest(&f.gate, "w", 2).await;
        let_others_run().await;
        assert!(!new.is_finished());

        tokio::time::advance(Duration::from_secs(8)).await;
        let_others_run().await;
        assert!(!new.is_finished(), "still inside the in-doubt grace");

        tokio::time::advance(Duration::from_secs(3)).await;
        new.await.unwrap().unwrap().settle();
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn after_an_unclean_stop_no_token_opens_before_the_grace_has_passed() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("gate.db")).unwrap();
        let grace = Duration::from_secs(10);
        let gate = Gate::new(store, grace, Metrics::new(), LastStop::Unclean);
        let first = admit_later(&gate, "w", 1);
        until_highest(&gate, "w", 1).await;
        let_others_run().await;
        assert!(
            !first.is_finished(),
            "the dead server's requests may still land"
        );
        tokio::time::advance(grace).await;
        first.await.unwrap().unwrap().settle();
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn after_a_clean_stop_the_first_token_opens_at_once() {
    within(async {
        let f = fixture(Duration::from_secs(10));
        let before = Instant::now();
        f.gate
            .admit(&key("w"), t(1), None, "")
            .await
            .unwrap()
            .settle();
        assert_eq!(
            Instant::now(),
            before,
            "no time passed, so there was no wait"
        );
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn same_token_requests_are_not_held_back_by_a_torn_down_one() {
    within(async {
        let f = fixture(Duration::from_secs(10));
        drop(f.gate.admit(&key("w"), t(1), None, "").await.unwrap());
        let before = Instant::now();
        let again = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        // The paused clock would jump over a wait, so prove there was none: no time passed.
        assert_eq!(
            Instant::now(),
            before,
            "a same-token request must not wait out the grace"
        );
        again.settle();
    })
    .await
}

#[tokio::test]
async fn jump_beyond_the_route_limit_is_refused() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        f.gate
            .admit(&key("w"), t(10), Some(5), "")
            .await
            .unwrap()
            .settle();
        f.gate
            .admit(&key("w"), t(15), Some(5), "")
            .await
            .unwrap()
            .settle();
        let refusal = f
            .gate
            .admit(&key("w"), t(21), Some(5), "")
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::Jump { limit: 5, .. }));
        assert_eq!(f.gate.highest(&key("w")).await.unwrap(), Some(t(15)));
    })
    .await
}

#[tokio::test]
async fn admit_all_refused_by_one_gate_raises_no_resource() {
    within(async {
        let f = fixture(Duration::from_secs(60));
        f.gate
            .admit(&key("b"), t(5), None, "")
            .await
            .unwrap()
            .settle();
        let refused = f
            .gate
            .admit_all(&key("a"), &[key("b")], t(3), None, "")
            .await
            .unwrap_err();
        assert_eq!(refused.resource, key("b"));
        assert!(matches!(refused.refusal, Refusal::Stale { highest } if highest == t(5)));
        assert_eq!(
            f.gate.highest(&key("a")).await.unwrap(),
            None,
            "a was not raised"
        );
        // Nothing of the refused request is left in flight or in doubt.
        assert!(!f.gate.anything_in_doubt());
    })
    .await
}

#[tokio::test]
async fn admit_all_passes_every_gate_and_raises_them_together() {
    within(async {
        let f = fixture(Duration::from_secs(60));
        f.gate
            .admit(&key("a"), t(2), None, "")
            .await
            .unwrap()
            .settle();
        let permits = f
            .gate
            .admit_all(&key("b"), &[key("a"), key("b")], t(4), None, "")
            .await
            .unwrap();
        assert_eq!(f.gate.highest(&key("a")).await.unwrap(), Some(t(4)));
        assert_eq!(f.gate.highest(&key("b")).await.unwrap(), Some(t(4)));
        // Both are in flight until the permits settle: a newer token waits on either.
        let waiting = admit_later(&f.gate, "a", 5);
        until_highest(&f.gate, "a", 5).await;
        let_others_run().await;
        assert!(!waiting.is_finished());
        assert_eq!(
            permits.settle(),
            Some(t(5)),
            "the greatest highest, for the header"
        );
        waiting.await.unwrap().unwrap().settle();
    })
    .await
}

#[tokio::test]
async fn a_superseded_second_gate_gives_the_first_permit_back_settled() {
    within(async {
        let f = fixture(Duration::from_secs(60));
        let old_b = f.gate.admit(&key("b"), t(1), None, "").await.unwrap();
        let both = {
            let gate = f.gate.clone();
            tokio::spawn(
                async move { gate.admit_all(&key("a"), &[key("b")], t(2), None, "").await },
            )
        };
        let_others_run().await;
        until_highest(&f.gate, "b", 2).await;
        assert!(!both.is_finished(), "waits for b's older request");
        // A newer leader supersedes b while the request holds a's permit.
        let newer = admit_later(&f.gate, "b", 3);
        until_highest(&f.gate, "b", 3).await;
        old_b.settle();
        let refused = both.await.unwrap().unwrap_err();
        assert_eq!(refused.resource, key("b"));
        newer.await.unwrap().unwrap().settle();
        // a's permit was given back settled: a's next token opens at once, not after the grace.
        let next_a = tokio::time::timeout(
            Duration::from_secs(5),
            f.gate.admit(&key("a"), t(3), None, ""),
        )
        .await
        .expect("a was left in doubt");
        next_a.unwrap().settle();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_same_resources_in_opposite_orders_do_not_deadlock() {
    within(async {
        let f = fixture(Duration::from_secs(60));
        let mut tasks = Vec::new();
        for round in 0..200u64 {
            let gate = f.gate.clone();
            let (first, second) = if round % 2 == 0 {
                ("a", "b")
            } else {
                ("b", "a")
            };
            tasks.push(tokio::spawn(async move {
                let token = t(1 + round / 10);
                match gate
                    .admit_all(&key(first), &[key(second)], token, None, "")
                    .await
                {
                    Ok(permits) => {
                        tokio::task::yield_now().await;
                        permits.settle();
                    }
                    Err(refused) => assert!(matches!(refused.refusal, Refusal::Stale { .. })),
                }
            }));
        }
        let all = async {
            for task in tasks {
                task.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("deadlocked");
    })
    .await
}

#[tokio::test]
async fn fence_raises_the_highest_after_in_flight_writes_drain() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let fence = {
            let gate = f.gate.clone();
            tokio::spawn(async move { gate.fence(&key("w"), t(7), "").await })
        };
        until_highest(&f.gate, "w", 7).await;
        let_others_run().await;
        assert!(!fence.is_finished());
        old.settle();
        assert_eq!(fence.await.unwrap().unwrap(), t(7));

        let stale = f.gate.fence(&key("w"), t(6), "").await.unwrap_err();
        assert!(matches!(stale, Refusal::Stale { highest } if highest == t(7)));
        assert_eq!(f.gate.fence(&key("w"), t(7), "").await.unwrap(), t(7));
    })
    .await
}

#[tokio::test]
async fn evicted_resources_reload_their_highest_from_the_database() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        f.gate
            .admit(&key("a"), t(4), None, "")
            .await
            .unwrap()
            .settle();
        let busy = f.gate.admit(&key("b"), t(9), None, "").await.unwrap();

        assert_eq!(
            f.gate.evict_idle(Duration::ZERO),
            1,
            "only the idle resource leaves"
        );
        assert_eq!(f.gate.resident(), 1);
        let refusal = f.gate.admit(&key("a"), t(3), None, "").await.unwrap_err();
        assert!(matches!(refusal, Refusal::Stale { highest } if highest == t(4)));
        busy.settle();
    })
    .await
}

#[tokio::test]
async fn reset_lowers_the_highest_and_the_lower_token_waits_for_in_flight_writes() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let runaway = f.gate.admit(&key("w"), t(1_000), None, "").await.unwrap();
        let reset = f.gate.reset(&key("w"), t(5), "runaway", "").await.unwrap();
        assert_eq!(reset.from, Some(t(1_000)));
        assert_eq!(f.gate.highest(&key("w")).await.unwrap(), Some(t(5)));

        let lower = admit_later(&f.gate, "w", 5);
        let_others_run().await;
        assert!(!lower.is_finished(), "token 1000 is still in flight");
        runaway.settle();
        lower.await.unwrap().unwrap().settle();
        let stale = f.gate.admit(&key("w"), t(4), None, "").await.unwrap_err();
        assert!(matches!(stale, Refusal::Stale { highest } if highest == t(5)));
    })
    .await
}

#[tokio::test]
async fn a_waiter_above_a_reset_token_is_refused_not_forwarded() {
    within(async {
        let f = fixture(Duration::from_secs(1));
        let old = f.gate.admit(&key("w"), t(1), None, "").await.unwrap();
        let waiter = admit_later(&f.gate, "w", 9);
        until_highest(&f.gate, "w", 9).await;
        f.gate.reset(&key("w"), t(2), "undo", "").await.unwrap();
        old.settle();
        let refusal = waiter.await.unwrap().unwrap_err();
        assert!(matches!(refusal, Refusal::NotDurable), "{refusal:?}");
    })
    .await
}

#[test]
fn an_older_durable_state_never_overwrites_a_newer_one() {
    let slot = Slot::new(0);
    let durable = |highest, seq| Durable {
        highest: Some(t(highest)),
        seq,
    };
    slot.observe(durable(9, 5), Reopen::No);
    slot.observe(durable(4, 3), Reopen::No);
    assert_eq!(slot.lock().highest(), Some(t(9)));
    slot.observe(durable(4, 6), Reopen::No);
    assert_eq!(
        slot.lock().highest(),
        Some(t(4)),
        "a later reset does lower it"
    );
}

#[test]
fn a_slot_stays_small() {
    // One per resident resource: 1,000,000 of them must fit in the memory budget of
    // bench/results/run.md. Growing past this is a decision, not an accident.
    assert!(
        std::mem::size_of::<Slot>() <= 56,
        "{}",
        std::mem::size_of::<Slot>()
    );
}

#[test]
fn packed_tokens_read_back_as_written() {
    let mut state = EpochState::new(0);
    assert_eq!((state.highest(), state.open()), (None, None));
    state.set_highest(Some(t(0)));
    state.set_open(Some(t(u64::MAX)));
    assert_eq!(
        (state.highest(), state.open()),
        (Some(t(0)), Some(t(u64::MAX)))
    );
    state.set_open(None);
    assert_eq!((state.highest(), state.open()), (Some(t(0)), None));
    state.set_highest(None);
    assert_eq!(state.highest(), None);
}

#[test]
fn in_doubt_deadlines_round_up_and_idleness_survives_the_32_bit_wrap() {
    let base = Instant::now();
    let mut state = EpochState::new(0);
    state.in_flight = 1;
    let now = base + Duration::from_micros(1_500);
    state.leave(now, base, Some(Duration::from_micros(2_200)));
    // 1.5 ms + 2.2 ms = 3.7 ms; each rounded up, the deadline is 5 ms: late, never early.
    assert_eq!(state.in_doubt_until.map(NonZeroU64::get), Some(5));
    assert!(!state.is_idle(4, Duration::ZERO), "still in doubt at 4 ms");
    assert!(state.is_idle(5, Duration::ZERO));

    let wrap = u64::from(u32::MAX) + 10;
    let mut state = EpochState::new(wrap - 20);
    assert!(
        !state.is_idle(wrap, Duration::from_millis(60)),
        "20 ms across the wrap"
    );
    assert!(state.is_idle(wrap + 40, Duration::from_millis(60)));
    state.enter();
    state.leave(base + Duration::from_millis(wrap + 40), base, None);
    assert!(!state.is_idle(wrap + 41, Duration::from_millis(60)));
}

#[test]
fn a_slot_used_after_the_evictions_clock_was_read_is_not_idle() {
    // The evictor reads the clock once, then walks a million slots while requests go on.
    let evictor_now = 100_000;
    let base = Instant::now();
    let mut state = EpochState::new(0);
    state.enter();
    assert!(
        !state.is_idle(evictor_now + 10_000_000, Duration::ZERO),
        "in flight, however long since it was made"
    );
    state.leave(base + Duration::from_millis(evictor_now + 5), base, None);
    assert!(!state.is_idle(evictor_now, Duration::from_secs(60)));
    assert!(!state.is_idle(evictor_now, Duration::ZERO));
    assert!(state.is_idle(evictor_now + 60_005, Duration::from_secs(60)));
}

/// The gate's state machine, driven by random steps against a model of the contract's rules.
mod properties {
    use super::*;
    use proptest::prelude::*;

    const GRACE_MS: u64 = 3;

    #[derive(Debug, Clone)]
    enum Step {
        /// The store makes a token durable; it keeps the maximum, as the writer does.
        Advance(u64),
        /// An operator lowers (or sets) the highest.
        Reset(u64),
        /// A request with this token asks for its turn.
        Open(u64),
        /// The `index`-th request in flight ends; `torn` if it was torn down mid-forward.
        Leave { index: usize, torn: bool },
        /// Milliseconds pass.
        Tick(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            2 => (0..6u64).prop_map(Step::Advance),
            1 => (0..6u64).prop_map(Step::Reset),
            6 => (0..6u64).prop_map(Step::Open),
            4 => (any::<usize>(), any::<bool>()).prop_map(|(index, torn)| Step::Leave { index, torn }),
            2 => (0..5u64).prop_map(Step::Tick),
        ]
    }

    /// What the contract allows, tracked beside the real state.
    #[derive(Default)]
    struct Model {
        highest: Option<u64>,
        in_flight: Vec<u64>,
        /// The last token forwarded since the last reset: forwarding never goes below it.
        forwarded: Option<u64>,
        /// Torn-down requests: their token and until when they may still land upstream.
        in_doubt: Vec<(u64, u64)>,
        /// A reset closed the open token: whatever comes next waits for everything before it.
        closed_by_reset: bool,
        now: u64,
        seq: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn forwarded_tokens_never_decrease_and_never_overlap_another_token(
            steps in prop::collection::vec(step(), 1..60),
        ) {
            let base = Instant::now();
            let slot = Slot::new(0);
            let mut model = Model::default();
            for step in steps {
                match step {
                    Step::Advance(token) => {
                        model.seq += 1;
                        let highest = model.highest.map_or(token, |h| h.max(token));
                        model.highest = Some(highest);
                        let durable = Durable { highest: Some(t(highest)), seq: model.seq };
                        slot.observe(durable, Reopen::No);
                    }
                    Step::Reset(token) => {
                        model.seq += 1;
                        model.highest = Some(token);
                        model.forwarded = None; // an audited, deliberate lowering
                        model.closed_by_reset = true;
                        slot.observe(Durable { highest: Some(t(token)), seq: model.seq }, Reopen::Yes);
                    }
                    Step::Open(token) => {
                        let turn = slot.lock().try_open(t(token), model.now);
                        check_turn(&mut model, token, turn)?;
                    }
                    Step::Leave { index, torn } => {
                        if model.in_flight.is_empty() {
                            continue;
                        }
                        let token = model.in_flight.swap_remove(index % model.in_flight.len());
                        let grace = torn.then_some(Duration::from_millis(GRACE_MS));
                        let now = base + Duration::from_millis(model.now);
                        slot.lock().leave(now, base, grace);
                        if torn {
                            model.in_doubt.push((token, model.now + GRACE_MS));
                        }
                    }
                    Step::Tick(ms) => model.now += ms,
                }
            }
        }
    }

    fn check_turn(model: &mut Model, token: u64, turn: Turn) -> Result<(), TestCaseError> {
        let now = model.now;
        // After a reset every earlier request counts as another epoch's, whatever its token.
        let other = |t: u64| t != token || model.closed_by_reset;
        let other_in_flight = model.in_flight.iter().any(|&t| other(t));
        let other_in_doubt = model
            .in_doubt
            .iter()
            .any(|&(t, until)| other(t) && until > now);
        match turn {
            Turn::Go => {
                prop_assert_eq!(
                    model.highest,
                    Some(token),
                    "only the durable highest is forwarded"
                );
                prop_assert!(!other_in_flight, "{token} forwarded beside another token");
                prop_assert!(
                    !other_in_doubt,
                    "{token} forwarded while another token is in doubt"
                );
                prop_assert!(
                    model.forwarded.is_none_or(|f| f <= token),
                    "forwarding went back"
                );
                model.forwarded = Some(token);
                model.closed_by_reset = false;
                model.in_flight.push(token);
            }
            Turn::Superseded { highest } => {
                prop_assert!(model.highest.is_some_and(|h| h > token));
                prop_assert_eq!(Some(highest.get()), model.highest);
            }
            Turn::NotDurable => prop_assert!(model.highest.is_none_or(|h| h < token)),
            Turn::Wait { .. } => {
                prop_assert_eq!(model.highest, Some(token));
                // Waiting is only for a reason the model can see: no needless stall.
                prop_assert!(
                    other_in_flight || other_in_doubt,
                    "{token} waits for nothing"
                );
            }
        }
        Ok(())
    }
}

/// What decides whether a stop is recorded as clean: a permit still held (in flight), or one
/// dropped unsettled whose in-doubt grace has not run out.
#[tokio::test]
async fn anything_in_doubt_sees_permits_in_flight_and_unsettled_ones_until_their_grace_ends() {
    within(async {
        let grace = Duration::from_millis(200);
        let f = fixture(grace);
        assert!(!f.gate.anything_in_doubt(), "a new gate");
        let permit = f.gate.admit(&key("a"), t(1), None, "").await.unwrap();
        assert!(f.gate.anything_in_doubt(), "a permit in flight");
        permit.settle();
        assert!(!f.gate.anything_in_doubt(), "settled");

        let permit = f.gate.admit(&key("a"), t(1), None, "").await.unwrap();
        drop(permit); // the upstream may still apply it
        assert!(f.gate.anything_in_doubt(), "dropped unsettled");
        tokio::time::sleep(grace + Duration::from_millis(50)).await;
        assert!(!f.gate.anything_in_doubt(), "the grace has run out");
    })
    .await
}

/// Eviction drops only what nobody needs: a slot a request holds (even one idle by its state), a
/// slot with a request in flight and a slot in doubt all stay, as the same slot; an idle,
/// unreferenced one goes. Dropping any of the others would let a second slot for the same
/// resource admit a token next to the first's, or forget that the upstream may still apply one.
#[tokio::test]
async fn eviction_keeps_every_slot_in_use_in_flight_or_in_doubt_and_drops_the_rest() {
    within(async {
        let f = fixture(Duration::from_secs(60));
        f.gate
            .admit(&key("idle"), t(1), None, "")
            .await
            .unwrap()
            .settle();
        let held = f.gate.slot(&key("held")).await.unwrap();
        let in_flight = f.gate.admit(&key("busy"), t(1), None, "").await.unwrap();
        drop(f.gate.admit(&key("doubt"), t(1), None, "").await.unwrap());
        assert_eq!(f.gate.resident(), 4);

        assert_eq!(f.gate.evict_idle(Duration::ZERO), 1, "only the idle one");
        assert_eq!(f.gate.resident(), 3);
        assert!(Arc::ptr_eq(
            &held,
            &f.gate.slot(&key("held")).await.unwrap()
        ));
        // The one in doubt still holds the next token back.
        let next = admit_later(&f.gate, "doubt", 2);
        let_others_run().await;
        assert!(!next.is_finished(), "the in-doubt request was forgotten");
        in_flight.settle();
        next.abort();
    })
    .await
}

/// A resource not in memory (after a restart or an eviction) is read from the store before it
/// is judged: its highest token is the stored one.
#[tokio::test]
async fn a_resource_not_in_memory_is_read_from_the_store_on_first_use() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("gate.db")).unwrap();
        let first = gate_on(store.clone(), Duration::from_secs(1));
        first
            .admit(&key("w"), t(7), None, "")
            .await
            .unwrap()
            .settle();
        let restarted = gate_on(store, Duration::from_secs(1));
        assert_eq!(restarted.resident(), 0);
        assert_eq!(restarted.highest(&key("w")).await.unwrap(), Some(t(7)));
        let refused = restarted
            .admit(&key("w"), t(6), None, "")
            .await
            .unwrap_err();
        assert!(matches!(refused, Refusal::Stale { highest } if highest == t(7)));
    })
    .await
}

/// Cluster mode's clean handoff of a shard asks only about that shard's resources: a permit in
/// flight, or one dropped unsettled until its grace ends, for a resource it picks; never another
/// resource's.
#[tokio::test]
async fn in_doubt_where_sees_only_the_resources_it_picks() {
    within(async {
        let grace = Duration::from_millis(200);
        let f = fixture(grace);
        let a = |resource: &ResourceKey| *resource == key("a");
        let b = |resource: &ResourceKey| *resource == key("b");
        f.gate
            .admit(&key("b"), t(1), None, "")
            .await
            .unwrap()
            .settle();
        assert!(!f.gate.in_doubt_where(a), "a new resource");
        let permit = f.gate.admit(&key("a"), t(1), None, "").await.unwrap();
        assert!(f.gate.in_doubt_where(a), "a permit in flight");
        assert!(!f.gate.in_doubt_where(b), "b has nothing in flight");
        permit.settle();
        assert!(!f.gate.in_doubt_where(a), "settled");

        drop(f.gate.admit(&key("a"), t(1), None, "").await.unwrap());
        assert!(f.gate.in_doubt_where(a), "dropped unsettled");
        assert!(!f.gate.in_doubt_where(b), "b has nothing in doubt");
        tokio::time::sleep(grace + Duration::from_millis(50)).await;
        assert!(!f.gate.in_doubt_where(a), "the grace has run out");
    })
    .await
}

/// Cluster mode forgets a shard it lost or took over: the resources picked lose their slots, so
/// the next request reads them afresh from the store, where another replica may have moved them
/// on; every other resource keeps its slot.
#[tokio::test]
async fn forget_where_drops_only_the_slots_it_picks_and_they_reload_from_the_store() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let (store, _guard) = SqliteStore::open(&dir.path().join("gate.db")).unwrap();
        let here = gate_on(store.clone(), Duration::from_secs(1));
        let elsewhere = gate_on(store, Duration::from_secs(1));
        for resource in ["a", "b"] {
            here.admit(&key(resource), t(4), None, "")
                .await
                .unwrap()
                .settle();
        }
        let a_before = here.slot(&key("a")).await.unwrap();
        let b_before = here.slot(&key("b")).await.unwrap();
        elsewhere
            .admit(&key("a"), t(9), None, "")
            .await
            .unwrap()
            .settle();

        here.forget_where(|resource| *resource == key("a"));
        assert!(!Arc::ptr_eq(
            &a_before,
            &here.slot(&key("a")).await.unwrap()
        ));
        assert!(Arc::ptr_eq(&b_before, &here.slot(&key("b")).await.unwrap()));
        let refusal = here.admit(&key("a"), t(7), None, "").await.unwrap_err();
        assert!(
            matches!(refusal, Refusal::Stale { highest } if highest == t(9)),
            "{refusal:?}"
        );
    })
    .await
}
