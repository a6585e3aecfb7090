//! What this registry knows, without asking its database, about which requests were routed
//! to which processor and of what kind they are: the routing an Acknowledge call is checked
//! against ([`Store::kinds_delivered_to`](super::Store::kinds_delivered_to)). A request's
//! Deliver rows are written with it at intake and never removed, and its kind never
//! changes, so a route once stored stays true:
//! intake remembers the routes of the requests it committed, and a lookup that missed
//! remembers what the database answered. Only the most recent routes are kept
//! ([`CAPACITY`]); an older one, or one stored by another replica, is read from the
//! database as before.
//!
//! Why: the read came before the call was queued for its group commit, so two processors'
//! acknowledgements arriving together were each held up by a read of their own, and often
//! committed in two transactions instead of one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use dsrelay_proto::v1::RequestKind;

/// Most routes remembered (about 150 bytes each).
pub(crate) const CAPACITY: usize = 16_384;

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// (processor, request id) → the request's kind.
    kinds: HashMap<(String, String), RequestKind>,
    /// The keys of `kinds`, oldest first.
    order: VecDeque<(String, String)>,
}

impl Routes {
    /// Remembers `(processor, request id, kind)` routes, each known to be stored.
    pub(crate) fn remember<'a>(
        &self,
        routes: impl IntoIterator<Item = (&'a str, &'a str, RequestKind)>,
    ) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (processor, request_id, kind) in routes {
            let key = (processor.to_string(), request_id.to_string());
            if known.kinds.insert(key.clone(), kind).is_none() {
                known.order.push_back(key);
            }
            while known.order.len() > CAPACITY {
                if let Some(oldest) = known.order.pop_front() {
                    known.kinds.remove(&oldest);
                }
            }
        }
    }

    /// The kinds of those of `ids` known to be routed to `processor`, and the ids not known
    /// (to be read from the database).
    pub(crate) fn lookup<'a>(
        &self,
        processor: &str,
        ids: &[&'a str],
    ) -> (HashMap<String, RequestKind>, Vec<&'a str>) {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for id in ids {
            match known.kinds.get(&(processor.to_string(), (*id).to_string())) {
                Some(kind) => {
                    found.insert((*id).to_string(), *kind);
                }
                None => missing.push(*id),
            }
        }
        (found, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_routes_per_processor_and_forgets_the_oldest_past_capacity() {
        let routes = Routes::default();
        use RequestKind::{Erasure, Transfer};
        routes.remember([
            ("p1", "r1", Erasure),
            ("p2", "r1", Erasure),
            ("p1", "r2", Transfer),
        ]);
        let (found, missing) = routes.lookup("p1", &["r1", "r2", "r3"]);
        assert_eq!(
            found,
            HashMap::from([("r1".to_string(), Erasure), ("r2".to_string(), Transfer)])
        );
        assert_eq!(missing, ["r3"]);
        // Routed to p2, not to p3.
        assert_eq!(routes.lookup("p3", &["r1"]).1, ["r1"]);
        let ids: Vec<String> = (0..CAPACITY).map(|i| format!("x{i}")).collect();
        routes.remember(ids.iter().map(|id| ("p1", id.as_str(), Erasure)));
        // The three first ones made way.
        assert_eq!(routes.lookup("p1", &["r1", "r2"]).1, ["r1", "r2"]);
        assert_eq!(routes.lookup("p2", &["r1"]).1, ["r1"]);
        assert!(routes.lookup("p1", &["x0"]).1.is_empty());
        let known = routes.known.lock().unwrap();
        assert_eq!((known.kinds.len(), known.order.len()), (CAPACITY, CAPACITY));
    }
}
