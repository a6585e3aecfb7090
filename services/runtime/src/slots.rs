//! Places counted per key (a caller's name, a certificate identity), each given back when
//! the guard that holds it is dropped: how the registry bounds one caller's open streams and
//! the gRPC server one identity's connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How many places each key holds.
#[derive(Debug, Default, Clone)]
pub struct KeyedSlots(Arc<Mutex<HashMap<String, u32>>>);

/// One place of one key; dropping it gives the place back.
#[derive(Debug)]
pub struct KeyedSlot {
    held: Arc<Mutex<HashMap<String, u32>>>,
    key: String,
}

impl KeyedSlots {
    /// A place for `key` while it holds fewer than `limit`; else how many it holds.
    pub fn take(&self, key: &str, limit: u32) -> Result<KeyedSlot, u32> {
        // Each count is written whole under the lock: one poisoned by a panic elsewhere is
        // still right, and refusing every caller after it would be worse.
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = held.entry(key.to_string()).or_default();
        if *open >= limit {
            let open = *open;
            if open == 0 {
                held.remove(key);
            }
            return Err(open);
        }
        *open += 1;
        Ok(KeyedSlot {
            held: self.0.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for KeyedSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = held.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_holds_up_to_its_limit_and_a_dropped_place_comes_back() {
        let slots = KeyedSlots::default();
        let a1 = slots.take("a", 2).unwrap();
        let _a2 = slots.take("a", 2).unwrap();
        assert_eq!(slots.take("a", 2).unwrap_err(), 2);
        let _b = slots.take("b", 2).unwrap();
        drop(a1);
        let _a3 = slots.take("a", 2).unwrap();
        assert_eq!(slots.take("a", 2).unwrap_err(), 2);
        assert_eq!(slots.take("c", 0).unwrap_err(), 0);
        // A key that holds nothing leaves no entry behind.
        drop(_b);
        assert!(!slots.0.lock().unwrap().contains_key("b"));
        assert!(!slots.0.lock().unwrap().contains_key("c"));
    }
}
