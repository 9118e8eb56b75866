//! A map kept as a sorted `Vec`: for the many small maps of the model and
//! the sources (the slices of one Service, the files defining one object),
//! which hold one entry almost always. A `BTreeMap` allocates a node sized
//! for eleven entries even for one (≈ 2 KiB for an EndpointSlice); this
//! holds exactly what it holds, and lookups stay logarithmic for the rare
//! large one (a Service with hundreds of slices).

/// A map of `K` to `V`, sorted by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// Inserts or replaces; gives the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                // Doubling, but from one slot (`Vec` would start at four).
                if self.entries.len() == self.entries.capacity() {
                    self.entries.reserve_exact(self.entries.len().max(1));
                }
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.find(key).ok()?;
        let (_, v) = self.entries.remove(i);
        if self.entries.len() * 2 <= self.entries.capacity() {
            self.entries.shrink_to_fit();
        }
        Some(v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_sorted_map() {
        let mut m = VecMap::default();
        assert!(m.is_empty());
        assert_eq!(m.insert("b".to_string(), 2), None);
        assert_eq!(m.insert("a".to_string(), 1), None);
        assert_eq!(m.insert("c".to_string(), 3), None);
        assert_eq!(m.insert("b".to_string(), 20), Some(2));
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec![1, 20, 3]);
        assert_eq!(m.values().next_back(), Some(&3));
        assert_eq!(m.get("b"), Some(&20));
        assert_eq!(m.remove("a"), Some(1));
        assert_eq!(m.remove("a"), None);
        assert_eq!(m.get("a"), None);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn one_entry_holds_one_slot() {
        let mut m = VecMap::default();
        m.insert(1u32, [0u8; 100]);
        assert_eq!(m.entries.capacity(), 1);
        m.insert(2, [0u8; 100]);
        m.remove(&2);
        assert_eq!(m.entries.capacity(), 1);
    }
}
