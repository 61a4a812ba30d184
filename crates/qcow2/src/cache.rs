//! A small least-recently-used map for metadata tables (L2 tables, refcount blocks), keyed by
//! host offset. Tables are written through on every change, so eviction never loses data.

use std::collections::HashMap;

pub(crate) struct Lru<T> {
    map: HashMap<u64, (T, u64)>,
    tick: u64,
    cap: usize,
}

impl<T> Lru<T> {
    pub(crate) fn new(cap: usize) -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
            cap: cap.max(4),
        }
    }
    pub(crate) fn get(&mut self, k: u64) -> Option<&mut T> {
        self.tick += 1;
        let t = self.tick;
        match self.map.get_mut(&k) {
            Some(e) => {
                e.1 = t;
                Some(&mut e.0)
            }
            None => None,
        }
    }
    pub(crate) fn contains(&self, k: u64) -> bool {
        self.map.contains_key(&k)
    }
    pub(crate) fn insert(&mut self, k: u64, v: T) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            if let Some((&old, _)) = self.map.iter().min_by_key(|(_, (_, t))| *t) {
                self.map.remove(&old);
            }
        }
        self.tick += 1;
        self.map.insert(k, (v, self.tick));
    }
    pub(crate) fn remove(&mut self, k: u64) {
        self.map.remove(&k);
    }
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}
