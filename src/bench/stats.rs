//! The summary of repeated timings: median, min and max.

use serde::Serialize;

/// Seconds per run over the timed runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// Median seconds per run.
    pub median_s: f64,
    /// Seconds of the fastest run.
    pub min_s: f64,
    /// Seconds of the slowest run.
    pub max_s: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl Stats {
    /// Summarises `samples` (seconds); `None` when there are none. The median of an even
    /// count is the mean of the two middle values.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median_s = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Self { median_s, min_s: sorted[0], max_s: sorted[n - 1], runs: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle_value() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(s, Stats { median_s: 2.0, min_s: 1.0, max_s: 3.0, runs: 3 });
    }

    #[test]
    fn even_count_averages_the_two_middle_values() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 10.0]).unwrap();
        assert_eq!(s, Stats { median_s: 3.5, min_s: 1.0, max_s: 10.0, runs: 4 });
    }

    #[test]
    fn single_and_empty() {
        assert_eq!(Stats::of(&[0.5]).unwrap(), Stats { median_s: 0.5, min_s: 0.5, max_s: 0.5, runs: 1 });
        assert_eq!(Stats::of(&[]), None);
    }
}
