//! The stamp every ledger writes: a unit (page, disk block or file) numbered `idx` at
//! generation `gen` holds word 0 = idx, word 1 = gen, word 2 = checksum(idx, gen, nonce),
//! word 3 = nonce, and words 4.. = seed(idx, gen, nonce) + j·K1. The nonce is drawn once per
//! agent start, so data left behind by an earlier run never matches. Generation 0 means "never
//! written" (memory pages must then be all zero; disk blocks and files are not compared).

pub const K1: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The expected words of one unit.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    pub idx: u64,
    pub gen: u64,
    pub nonce: u64,
    sum: u64,
    seed: u64,
}

impl Stamp {
    pub fn new(idx: u64, gen: u64, nonce: u64) -> Stamp {
        let sum = mix(idx ^ gen.rotate_left(32) ^ mix(nonce ^ 0x5151_5151_5151_5151));
        let seed = mix(mix(idx.wrapping_mul(K1) ^ gen) ^ nonce.rotate_left(17));
        Stamp { idx, gen, nonce, sum, seed }
    }

    /// Word `j` of the unit.
    pub fn word(&self, j: usize) -> u64 {
        match j {
            0 => self.idx,
            1 => self.gen,
            2 => self.sum,
            3 => self.nonce,
            _ => self.seed.wrapping_add((j as u64).wrapping_mul(K1)),
        }
    }

    pub fn fill(&self, words: &mut [u64]) {
        for (j, w) in words.iter_mut().enumerate() {
            *w = self.word(j);
        }
    }

    pub fn fill_bytes(&self, bytes: &mut [u8]) {
        for (j, c) in bytes.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&self.word(j).to_le_bytes());
        }
    }

    /// The first word that differs: (index, value found).
    pub fn check(&self, words: &[u64]) -> Option<(usize, u64)> {
        words.iter().enumerate().find(|(j, w)| **w != self.word(*j)).map(|(j, w)| (j, *w))
    }

    pub fn check_bytes(&self, bytes: &[u8]) -> Option<(usize, u64)> {
        bytes.chunks_exact(8).enumerate().map(|(j, c)| (j, le(c))).find(|(j, w)| *w != self.word(*j))
    }
}

/// Word `j` of a byte buffer (0 past its end).
pub fn word_at(bytes: &[u8], j: usize) -> u64 {
    bytes.get(j * 8..j * 8 + 8).map(le).unwrap_or(0)
}

fn le(c: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_every_single_flip_is_found() {
        let s = Stamp::new(7, 3, 99);
        let mut w = vec![0u64; 512];
        s.fill(&mut w);
        assert_eq!(s.check(&w), None);
        let mut b = vec![0u8; 4096];
        s.fill_bytes(&mut b);
        assert_eq!(s.check_bytes(&b), None);
        for j in [0, 1, 2, 3, 4, 100, 511] {
            let mut x = w.clone();
            x[j] ^= 1 << (j % 64);
            assert_eq!(s.check(&x), Some((j, x[j])));
        }
        // Another generation, unit or nonce is another stamp.
        for o in [Stamp::new(7, 4, 99), Stamp::new(8, 3, 99), Stamp::new(7, 3, 98)] {
            assert!(o.check(&w).is_some());
        }
        assert_eq!(word_at(&b, 1), 3);
        assert_eq!(word_at(&b, 512), 0);
    }
}
