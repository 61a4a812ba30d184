//! A dirty bitmap over a disk: one bit per granule (64 KiB by default), set for every range a
//! guest write touches, cleared when the mirror has read the granule.

/// Bits over `size` bytes at `granularity` bytes per bit.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    gran: u64,
    size: u64,
    words: Vec<u64>,
    count: u64,
}

impl DirtyBitmap {
    /// `granularity` must be a power of two ≥ 512.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let gran = granularity.max(512).next_power_of_two();
        let bits = size.div_ceil(gran);
        DirtyBitmap { gran, size, words: vec![0; bits.div_ceil(64) as usize], count: 0 }
    }
    pub fn granularity(&self) -> u64 {
        self.gran
    }
    fn bits(&self) -> u64 {
        self.size.div_ceil(self.gran)
    }
    /// Number of dirty granules.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Dirty bytes (granules × granularity, the last one clipped to the disk).
    pub fn dirty_bytes(&self) -> u64 {
        (self.count * self.gran).min(self.size)
    }
    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits() && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }
    fn set_bit(&mut self, bit: u64) {
        let w = &mut self.words[(bit / 64) as usize];
        if *w & (1 << (bit % 64)) == 0 {
            *w |= 1 << (bit % 64);
            self.count += 1;
        }
    }
    /// Marks every granule `[off, off+len)` touches (clipped to the disk).
    pub fn set_range(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = off.saturating_add(len).min(self.size);
        for b in off / self.gran..end.div_ceil(self.gran) {
            self.set_bit(b);
        }
    }
    /// Clears granules `first..first+n`.
    pub fn clear_bits(&mut self, first: u64, n: u64) {
        for b in first..(first + n).min(self.bits()) {
            let w = &mut self.words[(b / 64) as usize];
            if *w & (1 << (b % 64)) != 0 {
                *w &= !(1 << (b % 64));
                self.count -= 1;
            }
        }
    }
    pub fn set_all(&mut self) {
        for b in 0..self.bits() {
            self.set_bit(b);
        }
    }
    /// The next run of set bits at or after `from`, at most `max` long: `(first, n)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let bits = self.bits();
        let mut b = from;
        while b < bits {
            let w = self.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += w.trailing_zeros() as u64;
            let first = b;
            while b < bits && b - first < max && self.is_set(b) {
                b += 1;
            }
            return Some((first, b - first));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_and_runs() {
        let mut m = DirtyBitmap::new(1 << 20, 65536);
        assert_eq!(m.next_run(0, 100), None);
        m.set_range(65535, 2); // touches granules 0 and 1
        m.set_range(10 * 65536, 1);
        assert_eq!(m.count(), 3);
        assert_eq!(m.next_run(0, 100), Some((0, 2)));
        assert_eq!(m.next_run(0, 1), Some((0, 1)));
        assert_eq!(m.next_run(2, 100), Some((10, 1)));
        m.clear_bits(0, 2);
        assert_eq!(m.count(), 1);
        m.set_range(u64::MAX - 5, 100); // beyond the disk: ignored
        assert_eq!(m.count(), 1);
        m.set_all();
        assert_eq!(m.dirty_bytes(), 1 << 20);
    }

    proptest! {
        /// The bitmap agrees with a plain set of granules after random sets and clears.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..40, 1u64..5), 1..60)) {
            let g = 4096;
            let mut m = DirtyBitmap::new(40 * g, g);
            let mut model = std::collections::BTreeSet::new();
            for (set, start, n) in ops {
                if set {
                    m.set_range(start * g + 7, n * g - 8);
                    for b in start..(start + n).min(40) { model.insert(b); }
                } else {
                    m.clear_bits(start, n);
                    for b in start..start + n { model.remove(&b); }
                }
                prop_assert_eq!(m.count(), model.len() as u64);
            }
            let mut seen = Vec::new();
            let mut at = 0;
            while let Some((f, n)) = m.next_run(at, 3) {
                seen.extend(f..f + n);
                at = f + n;
            }
            prop_assert_eq!(seen, model.into_iter().collect::<Vec<_>>());
        }
    }
}
