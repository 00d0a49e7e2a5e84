//! Groups (rooms, matches, topics): which connections are in which group,
//! and the backplane that carries a group past one server.
//!
//! Each loop keeps the members it owns (`LoopGroups`), so publishing
//! touches no lock per member: a message is encoded once, and every loop
//! with members gets the same bytes in one command. The server-wide
//! `Registry` counts members per group and per loop; it is what tells a
//! publisher which loops to reach, gives member counts, and tells the
//! backplane when a group gets its first member here or loses its last.
//!
//! A join through `Handle` is counted in the registry before its command
//! is posted, and undone if the connection turns out closed: a thread that
//! joins a connection and then publishes reaches that loop, and the
//! mailbox's order puts the join first.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::handle::Handle;

/// Carries group messages between servers (nodes), through a broker that
/// every node reaches; see `wharf::cluster` for the Redis one.
///
/// The server calls it from its loops and from any thread that publishes,
/// so no method may block: hand the work to a thread of your own.
/// `subscribe` and `unsubscribe` are called with the server's group
/// registry locked, in the order the group gained and lost its members
/// here: they must not call back into the server's group methods.
///
/// Messages from other nodes go to [`Handle::publish_local`], which
/// delivers them here without passing them back to the backplane.
pub trait Backplane: Send + Sync + 'static {
    /// The server has started; `handle` reaches it until `detach`.
    fn attach(&self, handle: Handle);
    /// `group` has its first member on this node.
    fn subscribe(&self, group: &str);
    /// `group` has lost its last member on this node.
    fn unsubscribe(&self, group: &str);
    /// `msg` was published to `group` on this node (and delivered to its
    /// members here): carry it to the other nodes.
    fn publish(&self, group: &str, msg: &[u8]);
    /// The server has stopped: no more calls follow.
    fn detach(&self);
}

/// Member counts per group, server-wide.
pub(crate) struct Registry {
    groups: Mutex<HashMap<Arc<str>, Counts>>,
    loops: usize,
    pub(crate) backplane: Option<Arc<dyn Backplane>>,
}

struct Counts {
    name: Arc<str>,
    total: usize,
    /// Members per loop, with the joins posted to that loop and not yet
    /// carried out.
    per_loop: Box<[u32]>,
}

impl Registry {
    pub(crate) fn new(loops: usize, backplane: Option<Arc<dyn Backplane>>) -> Registry {
        Registry {
            groups: Mutex::new(HashMap::new()),
            loops,
            backplane,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Counts>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One more member of `group` on loop `index`; the group's name as the
    /// registry holds it (shared with the loops, not copied per member).
    pub(crate) fn add(&self, index: usize, group: &str) -> Arc<str> {
        let mut groups = self.lock();
        if let Some(counts) = groups.get_mut(group) {
            counts.total += 1;
            counts.per_loop[index] += 1;
            return counts.name.clone();
        }
        let name: Arc<str> = Arc::from(group);
        let mut per_loop = vec![0; self.loops].into_boxed_slice();
        per_loop[index] = 1;
        let counts = Counts {
            name: name.clone(),
            total: 1,
            per_loop,
        };
        groups.insert(name.clone(), counts);
        if let Some(b) = &self.backplane {
            b.subscribe(group);
        }
        name
    }

    /// One member fewer of `group` on loop `index`.
    pub(crate) fn remove(&self, index: usize, group: &str) {
        let mut groups = self.lock();
        let Some(counts) = groups.get_mut(group) else {
            debug_assert!(false, "a member left a group the registry lacks");
            return;
        };
        counts.total -= 1;
        counts.per_loop[index] -= 1;
        if counts.total == 0 {
            groups.remove(group);
            if let Some(b) = &self.backplane {
                b.unsubscribe(group);
            }
        }
    }

    /// The name of `group` and the loops that have members of it (or
    /// joins on their way); `None` if it has none. Read under the lock,
    /// posted to after it.
    pub(crate) fn loops_of(&self, group: &str) -> Option<(Arc<str>, LoopSet)> {
        let groups = self.lock();
        let counts = groups.get(group)?;
        let mut set = LoopSet::default();
        for (i, &n) in counts.per_loop.iter().enumerate() {
            if n > 0 {
                set.insert(i);
            }
        }
        Some((counts.name.clone(), set))
    }

    pub(crate) fn size(&self, group: &str) -> usize {
        self.lock().get(group).map_or(0, |c| c.total)
    }

    pub(crate) fn list(&self) -> Vec<(String, usize)> {
        let mut all: Vec<(String, usize)> = self
            .lock()
            .iter()
            .map(|(name, c)| (name.to_string(), c.total))
            .collect();
        all.sort();
        all
    }
}

/// A set of loop indexes (there are at most `id::MAX_LOOPS`).
#[derive(Default, Clone, Copy)]
pub(crate) struct LoopSet([u64; crate::id::MAX_LOOPS / 64]);

impl LoopSet {
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(w, mut bits)| {
            std::iter::from_fn(move || {
                let bit = (bits != 0).then(|| bits.trailing_zeros() as usize)?;
                bits &= bits - 1;
                Some(w * 64 + bit)
            })
        })
    }
}

/// The groups a connection is in (one empty pointer for a connection in
/// none, so that idle connections pay nothing for groups).
#[derive(Default)]
#[allow(clippy::box_collection)] // one pointer, not a Vec's three words
pub(crate) struct Memberships(Option<Box<Vec<Arc<str>>>>);

impl Memberships {
    pub(crate) fn contains(&self, group: &str) -> bool {
        self.iter().any(|g| g == group)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().flat_map(|v| v.iter().map(|g| &**g))
    }

    fn push(&mut self, group: Arc<str>) {
        self.0.get_or_insert_with(Default::default).push(group);
    }

    fn remove(&mut self, group: &str) -> bool {
        let Some(v) = &mut self.0 else {
            return false;
        };
        let Some(i) = v.iter().position(|g| &**g == group) else {
            return false;
        };
        v.swap_remove(i);
        if v.is_empty() {
            self.0 = None;
        }
        true
    }

    fn take(&mut self) -> Vec<Arc<str>> {
        self.0.take().map(|v| *v).unwrap_or_default()
    }
}

/// One loop's groups: the slots of its members.
#[derive(Default)]
pub(crate) struct LoopGroups {
    members: HashMap<Arc<str>, HashSet<u32>>,
    /// Publishes made in callbacks during this turn, for this loop's other
    /// members (the callback holds only its own connection): carried out
    /// by the loop when the callback has returned.
    pub(crate) outbox: Vec<Outgoing>,
}

/// A group message on its way to a loop's members.
pub(crate) struct Outgoing {
    pub(crate) group: Arc<str>,
    pub(crate) wire: Bytes,
    /// The slot that published it and has had it already.
    pub(crate) skip: Option<u32>,
}

impl LoopGroups {
    /// Adds slot `key` to the group `name` (the registry's); false if it
    /// was in it already.
    pub(crate) fn insert(&mut self, key: u32, name: Arc<str>, of: &mut Memberships) -> bool {
        if of.contains(&name) {
            return false;
        }
        self.members.entry(name.clone()).or_default().insert(key);
        of.push(name);
        true
    }

    /// Removes slot `key` from `group`; false if it was not in it.
    pub(crate) fn remove(&mut self, key: u32, group: &str, of: &mut Memberships) -> bool {
        if !of.remove(group) {
            return false;
        }
        if let Some(set) = self.members.get_mut(group) {
            set.remove(&key);
            if set.is_empty() {
                self.members.remove(group);
            }
        }
        true
    }

    /// Removes slot `key` from every group it is in (it is closing).
    pub(crate) fn remove_all(
        &mut self,
        key: u32,
        of: &mut Memberships,
        registry: &Registry,
        index: usize,
    ) {
        for group in of.take() {
            if let Some(set) = self.members.get_mut(&group) {
                set.remove(&key);
                if set.is_empty() {
                    self.members.remove(&group);
                }
            }
            registry.remove(index, &group);
        }
    }

    /// The slots of `group`'s members on this loop.
    pub(crate) fn members(&self, group: &str) -> Option<&HashSet<u32>> {
        self.members.get(group)
    }

    /// Members of `group` on this loop.
    pub(crate) fn count(&self, group: &str) -> usize {
        self.members.get(group).map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_sets_list_what_they_hold() {
        let mut set = LoopSet::default();
        assert_eq!(set.iter().count(), 0);
        for i in [0, 3, 63, 64, 130, 255] {
            set.insert(i);
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 3, 63, 64, 130, 255]);
        assert!(set.contains(130) && !set.contains(131));
    }

    #[test]
    fn the_registry_counts_per_loop_and_forgets_empty_groups() {
        let r = Registry::new(3, None);
        let a = r.add(0, "a");
        let a2 = r.add(2, "a");
        assert!(Arc::ptr_eq(&a, &a2), "one name, shared");
        r.add(2, "b");
        let (_, loops) = r.loops_of("a").unwrap();
        assert_eq!(loops.iter().collect::<Vec<_>>(), [0, 2]);
        assert_eq!((r.size("a"), r.size("b"), r.size("c")), (2, 1, 0));
        r.remove(0, "a");
        r.remove(2, "a");
        assert!(r.loops_of("a").is_none());
        assert_eq!(r.list(), [("b".to_string(), 1)]);
    }
}
