//! One group commit's writes, worked out in memory before they are sent: the same rules, in the
//! same order, as the SQLite writer applies them statement by statement, so that PostgreSQL gets
//! a handful of set-based statements per batch however many writes it holds.
//!
//! Pure: the caller loads the current highest tokens of every resource the batch touches (locked
//! `FOR UPDATE`), runs [`Batch::apply`] for each write in order, then writes the rows it collected.

use std::collections::HashMap;

use crate::audit::Rejection;
use crate::route::ResourceKey;
use crate::store::queue::{Reply, Write};
use crate::store::{Advance, AllAdvanced, Durable, Reset, StoreError, Via};
use crate::token::FencingToken;

/// A change of a resource's highest token, for the epoch history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EpochChange {
    pub resource: ResourceKey,
    pub from: Option<FencingToken>,
    pub to: FencingToken,
    pub via: Via,
    pub reason: Option<String>,
}

/// A write whose outcome is known, waiting for the commit to be answered.
pub(super) enum Outcome {
    Advance(Reply<Advance>, Advance),
    AdvanceAll(Reply<AllAdvanced>, AllAdvanced),
    Reset(Reply<Reset>, Reset),
    Recorded(Reply<()>),
}

impl Outcome {
    pub(super) fn succeed(self) {
        // A caller that has gone away no longer needs its answer; the write stands regardless.
        match self {
            Outcome::Advance(reply, advance) => drop(reply.send(Ok(advance))),
            Outcome::AdvanceAll(reply, advanced) => drop(reply.send(Ok(advanced))),
            Outcome::Reset(reply, reset) => drop(reply.send(Ok(reset))),
            Outcome::Recorded(reply) => drop(reply.send(Ok(()))),
        }
    }

    pub(super) fn fail(self, error: StoreError) {
        match self {
            Outcome::Advance(reply, _) => drop(reply.send(Err(error))),
            Outcome::AdvanceAll(reply, _) => drop(reply.send(Err(error))),
            Outcome::Reset(reply, _) => drop(reply.send(Err(error))),
            Outcome::Recorded(reply) => drop(reply.send(Err(error))),
        }
    }
}

/// The rows one batch writes, and the answers it owes.
#[derive(Default)]
pub(super) struct Batch {
    /// Every touched resource's highest token as the batch goes (`None`: never seen).
    highest: HashMap<ResourceKey, Option<FencingToken>>,
    /// Resources whose highest changed, in first-change order.
    changed: Vec<ResourceKey>,
    pub epochs: Vec<EpochChange>,
    pub rejections: Vec<Rejection>,
    pub outcomes: Vec<Outcome>,
}

impl Batch {
    /// A batch that starts from `highest`: every resource its writes touch, as loaded.
    pub(super) fn new(highest: HashMap<ResourceKey, Option<FencingToken>>) -> Self {
        Self {
            highest,
            ..Self::default()
        }
    }

    /// Applies `write`, numbered `seq` in commit order.
    pub(super) fn apply(&mut self, write: Write, seq: u64) {
        let outcome = match write {
            Write::Advance {
                resource,
                token,
                via,
                reply,
            } => {
                let previous = self.get(&resource);
                let advance = match previous.filter(|highest| *highest >= token) {
                    Some(highest) => Advance::AlreadyAt { highest, seq },
                    None => {
                        self.set(&resource, previous, token, via, None);
                        Advance::Raised {
                            from: previous,
                            seq,
                        }
                    }
                };
                Outcome::Advance(reply, advance)
            }
            Write::AdvanceAll {
                resources,
                token,
                via,
                reply,
            } => {
                let previous: Vec<_> = resources.iter().map(|r| self.get(r)).collect();
                let refused_by = previous
                    .iter()
                    .position(|highest| highest.is_some_and(|highest| highest > token));
                if refused_by.is_none() {
                    for (resource, from) in resources.iter().zip(&previous) {
                        if from.is_none_or(|from| from < token) {
                            self.set(resource, *from, token, via, None);
                        }
                    }
                }
                Outcome::AdvanceAll(
                    reply,
                    AllAdvanced {
                        previous,
                        refused_by,
                        token,
                        seq,
                    },
                )
            }
            Write::Reset {
                resource,
                token,
                reason,
                reply,
            } => {
                let previous = self.get(&resource);
                self.set(&resource, previous, token, Via::Reset, Some(reason));
                let reset = Reset {
                    from: previous,
                    durable: Durable {
                        highest: Some(token),
                        seq,
                    },
                };
                Outcome::Reset(reply, reset)
            }
            Write::Reject { rejection, reply } => {
                self.rejections.push(*rejection);
                Outcome::Recorded(reply)
            }
        };
        self.outcomes.push(outcome);
    }

    /// The final highest token of every resource the batch changed.
    pub(super) fn changed(&self) -> impl Iterator<Item = (&ResourceKey, FencingToken)> {
        self.changed.iter().filter_map(|resource| {
            self.highest
                .get(resource)
                .copied()
                .flatten()
                .map(|highest| (resource, highest))
        })
    }

    fn get(&self, resource: &ResourceKey) -> Option<FencingToken> {
        self.highest.get(resource).copied().flatten()
    }

    fn set(
        &mut self,
        resource: &ResourceKey,
        from: Option<FencingToken>,
        to: FencingToken,
        via: Via,
        reason: Option<String>,
    ) {
        if !self.changed.contains(resource) {
            self.changed.push(resource.clone());
        }
        self.highest.insert(resource.clone(), Some(to));
        self.epochs.push(EpochChange {
            resource: resource.clone(),
            from,
            to,
            via,
            reason,
        });
    }
}

/// Every resource a write touches (a rejection's too: its row is conditional on the lease of
/// its resource's shard).
pub(super) fn resources_of(write: &Write) -> Vec<&ResourceKey> {
    match write {
        Write::Advance { resource, .. } | Write::Reset { resource, .. } => vec![resource],
        Write::AdvanceAll { resources, .. } => resources.iter().collect(),
        Write::Reject { rejection, .. } => vec![&rejection.resource],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn key(name: &str) -> ResourceKey {
        ResourceKey::new(name)
    }

    fn token(value: u64) -> FencingToken {
        FencingToken::new(value)
    }

    fn advance(resource: &str, to: u64) -> (Write, oneshot::Receiver<Result<Advance, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let write = Write::Advance {
            resource: key(resource),
            token: token(to),
            via: Via::Write,
            reply,
        };
        (write, answer)
    }

    #[test]
    fn writes_in_one_batch_see_each_other_in_order() {
        let mut batch = Batch::new(HashMap::from([
            (key("w"), Some(token(5))),
            (key("n"), None),
        ]));
        let (first, mut first_answer) = advance("w", 7);
        let (lower, mut lower_answer) = advance("w", 6);
        let (fresh, _) = advance("n", 1);
        batch.apply(first, 1);
        batch.apply(lower, 2);
        batch.apply(fresh, 3);
        let changed: Vec<_> = batch
            .changed()
            .map(|(r, t)| (r.as_str().to_owned(), t))
            .collect();
        assert_eq!(
            changed,
            vec![("w".into(), token(7)), ("n".into(), token(1))]
        );
        assert_eq!(batch.epochs.len(), 2);
        assert_eq!(batch.epochs[0].from, Some(token(5)));
        assert_eq!(batch.epochs[1].from, None);
        batch.outcomes.into_iter().for_each(Outcome::succeed);
        assert_eq!(
            first_answer.try_recv().unwrap().unwrap(),
            Advance::Raised {
                from: Some(token(5)),
                seq: 1
            }
        );
        assert_eq!(
            lower_answer.try_recv().unwrap().unwrap(),
            Advance::AlreadyAt {
                highest: token(7),
                seq: 2
            }
        );
    }

    #[test]
    fn advance_all_is_all_or_nothing_and_a_reset_may_lower() {
        let mut batch = Batch::new(HashMap::from([
            (key("a"), None),
            (key("b"), Some(token(9))),
        ]));
        let (reply, mut refused) = oneshot::channel();
        batch.apply(
            Write::AdvanceAll {
                resources: vec![key("a"), key("b")],
                token: token(8),
                via: Via::Write,
                reply,
            },
            1,
        );
        assert_eq!(batch.changed().count(), 0, "b is above 8: nothing written");
        let (reply, _) = oneshot::channel();
        batch.apply(
            Write::Reset {
                resource: key("b"),
                token: token(2),
                reason: "runaway".into(),
                reply,
            },
            2,
        );
        let changed: Vec<_> = batch.changed().map(|(_, t)| t).collect();
        assert_eq!(changed, vec![token(2)]);
        assert_eq!(batch.epochs[0].reason.as_deref(), Some("runaway"));
        batch.outcomes.into_iter().for_each(Outcome::succeed);
        assert_eq!(refused.try_recv().unwrap().unwrap().refused_by, Some(1));
    }
}
