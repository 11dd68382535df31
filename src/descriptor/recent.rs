//! Remembering the last few results of a pure function of a text, per thread.
//!
//! Repos repeat themselves: the same cron schedule on a hundred pipelines, the same manifests
//! rendered by fifty stagings. Loading on a thread asks the same question of the same text again
//! and again; a short list per thread answers the repeats without locks, and forgets.

use std::cell::RefCell;
use std::thread::LocalKey;

/// The results remembered on one thread: texts and what was found for them, oldest first.
pub type Recent<V> = RefCell<Vec<(String, V)>>;

/// `find(text)`, from `recent` when `text` is among the last `limit` texts asked of it on this
/// thread. `find` must depend on nothing but `text`.
pub fn remembered<V: Clone + 'static>(
    recent: &'static LocalKey<Recent<V>>,
    limit: usize,
    text: &str,
    find: impl FnOnce(&str) -> V,
) -> V {
    let known = recent.with_borrow(|recent| {
        recent
            .iter()
            .find(|(seen, _)| seen == text)
            .map(|(_, found)| found.clone())
    });
    known.unwrap_or_else(|| {
        let found = find(text);
        recent.with_borrow_mut(|recent| {
            if recent.len() >= limit {
                drop(recent.remove(0));
            }
            recent.push((text.to_string(), found.clone()));
        });
        found
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static LENGTHS: Recent<usize> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_repeat_is_answered_from_memory_and_the_oldest_is_forgotten_past_the_limit() {
        let asked = Cell::new(0);
        let length = |text: &str| {
            asked.set(asked.get() + 1);
            text.len()
        };
        assert_eq!(remembered(&LENGTHS, 2, "one", length), 3);
        assert_eq!(remembered(&LENGTHS, 2, "one", length), 3);
        assert_eq!(asked.get(), 1);
        assert_eq!(remembered(&LENGTHS, 2, "three", length), 5);
        assert_eq!(remembered(&LENGTHS, 2, "eleven", length), 6);
        assert_eq!(asked.get(), 3);
        // "one" was the oldest of three with room for two: asked again.
        assert_eq!(remembered(&LENGTHS, 2, "one", length), 3);
        assert_eq!(asked.get(), 4);
        LENGTHS.with_borrow(|recent| assert_eq!(recent.len(), 2));
    }
}
