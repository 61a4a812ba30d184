//! Median / min / max of a set of samples, and the Godwit/QEMU ratio of two medians.

use serde::{Deserialize, Serialize};

/// A summary of one metric's samples (`None` values were runs that had no value, e.g. n/a).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

/// The median (mean of the two middle values for an even count), min and max; `None` when
/// there is no finite sample.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        median,
        min: v[0],
        max: v[n - 1],
        samples: samples.to_vec(),
    })
}

/// Godwit median ÷ QEMU median, when both exist and QEMU's is not zero.
pub fn ratio(godwit: Option<&Summary>, qemu: Option<&Summary>) -> Option<f64> {
    match (godwit, qemu) {
        (Some(g), Some(q)) if q.median != 0.0 => Some(g.median / q.median),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_medians() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn non_finite_samples_are_ignored_and_empty_is_none() {
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
        let s = summarize(&[f64::NAN, 2.0]).unwrap();
        assert_eq!((s.n, s.median), (1, 2.0));
    }

    #[test]
    fn ratio_needs_both_sides() {
        let g = summarize(&[2.0]).unwrap();
        let q = summarize(&[8.0]).unwrap();
        assert_eq!(ratio(Some(&g), Some(&q)), Some(0.25));
        assert_eq!(ratio(Some(&g), None), None);
        let z = summarize(&[0.0]).unwrap();
        assert_eq!(ratio(Some(&g), Some(&z)), None);
    }
}
