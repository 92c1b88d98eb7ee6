//! Medians and spreads of repeated measurements.

use serde::Serialize;

/// Summary of repeated measurements of one quantity.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Sample {
    pub fn of(values: &[f64]) -> Self {
        assert!(!values.is_empty(), "no measurements");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_and_spread() {
        let s = Sample::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 5.0, 3));
        assert_eq!(Sample::of(&[4.0, 2.0]).median, 3.0);
    }
}
