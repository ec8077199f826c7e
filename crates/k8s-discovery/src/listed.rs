//! The objects a watch has reported, by name, with a relist taking effect only once it is
//! complete (a snapshot never holds half a list).

use std::collections::BTreeMap;

use kube::runtime::watcher::Event;

/// One object as a watch event carries it: its name, and what is kept of it (`None`: gone,
/// deleted or no longer of interest).
pub(crate) type Named<V> = (String, Option<V>);

/// Reduces each object of `event` with `keep` as it arrives (what is not kept is not stored).
pub(crate) fn named<K: kube::Resource, V>(
    event: Event<K>,
    keep: impl Fn(&K) -> Option<V>,
) -> Event<Named<V>> {
    let reduce = |object: K| (object.meta().name.clone().unwrap_or_default(), keep(&object));
    match event {
        Event::Apply(object) => Event::Apply(reduce(object)),
        Event::Delete(object) => {
            Event::Delete((object.meta().name.clone().unwrap_or_default(), None))
        }
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(reduce(object)),
        Event::InitDone => Event::InitDone,
    }
}

/// What a watch has listed and reported since.
#[derive(Debug)]
pub(crate) struct Listed<V> {
    current: BTreeMap<String, V>,
    /// A relist in progress.
    relist: Option<BTreeMap<String, V>>,
    synced: bool,
}

impl<V> Default for Listed<V> {
    fn default() -> Self {
        Self { current: BTreeMap::new(), relist: None, synced: false }
    }
}

impl<V> Listed<V> {
    /// Folds in one event; true when the current objects may have changed.
    pub(crate) fn apply(&mut self, event: Event<Named<V>>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply((name, kept)) => {
                if let (Some(relist), Some(kept)) = (&mut self.relist, kept) {
                    relist.insert(name, kept);
                }
                false
            }
            Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.current = relist;
                }
                self.synced = true;
                true
            }
            Event::Apply((name, Some(kept))) => {
                self.current.insert(name, kept);
                true
            }
            Event::Apply((name, None)) | Event::Delete((name, _)) => {
                self.current.remove(&name);
                true
            }
        }
    }

    /// Listed in full at least once.
    pub(crate) fn synced(&self) -> bool {
        self.synced
    }

    /// The objects, by name.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.current.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listed: &Listed<u32>) -> Vec<u32> {
        listed.values().copied().collect()
    }

    #[test]
    fn a_relist_replaces_the_objects_only_once_complete() {
        let mut listed = Listed::default();
        listed.apply(Event::Init);
        listed.apply(Event::InitApply(("a".to_owned(), Some(1))));
        assert!(!listed.synced() && names(&listed).is_empty(), "half a list is not shown");
        assert!(listed.apply(Event::InitDone));
        assert_eq!(names(&listed), [1]);
        assert!(listed.apply(Event::Apply(("b".to_owned(), Some(2)))));
        listed.apply(Event::Init);
        listed.apply(Event::InitApply(("b".to_owned(), Some(3))));
        listed.apply(Event::InitApply(("c".to_owned(), None)));
        assert_eq!(names(&listed), [1, 2], "the old list stands during a relist");
        listed.apply(Event::InitDone);
        assert_eq!(
            names(&listed),
            [3],
            "`a` went unseen during the relist; not kept is not stored"
        );
        listed.apply(Event::Apply(("b".to_owned(), None)));
        assert!(names(&listed).is_empty(), "an object no longer kept leaves");
        listed.apply(Event::Apply(("d".to_owned(), Some(4))));
        listed.apply(Event::Delete(("d".to_owned(), None)));
        assert!(names(&listed).is_empty());
    }
}
