//! What a scaling curve says: computed from the numbers, never typed by hand.
//!
//! Input: ops/s at increasing thread counts for one configuration. Output: the saturation
//! point (the thread count past which doubling threads adds < 10%, and no larger thread count
//! is 20% or more above it, so that a dip in a noisy curve is not taken for the knee), the
//! maximum speedup, and a classification:
//! - `scaling`: throughput still grows ≥ 10% at the largest thread count measured;
//! - `saturated`: it grew, then stopped growing (the device or a shared resource is full);
//! - `serialized`: it never grew by 20% (one queue, or one op already fills the device);
//! - `collapsing`: the largest thread count is < 80% of the best (contention costs more than
//!   parallelism gains).

use serde::Serialize;

/// Growth below which more threads "add nothing" (10%).
pub const SATURATION_GAIN: f64 = 1.10;
/// Best speedup below which a curve counts as serialized.
pub const SERIALIZED_SPEEDUP: f64 = 1.20;
/// Growth over the knee that a later point must not reach (two steps of [`SATURATION_GAIN`]'s
/// 10%): past the saturation point nothing measured is 20% or more above it.
pub const SATURATION_SLACK: f64 = 1.20;
/// Fraction of the best below which the last point counts as a collapse.
pub const COLLAPSE_FRACTION: f64 = 0.80;

/// The classification of a curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaling {
    /// Still growing at the largest thread count.
    Scaling,
    /// Grew, then flattened.
    Saturated,
    /// Never grew.
    Serialized,
    /// Fell after a peak.
    Collapsing,
}

/// The verdict on one curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// Thread count past which more threads add < 10% (the largest measured if none).
    pub saturation_threads: usize,
    /// Best ops/s over ops/s at the smallest thread count.
    pub max_speedup: f64,
    /// Thread count of the best ops/s.
    pub best_threads: usize,
    /// Speedup at saturation over the ideal (threads / smallest threads).
    pub efficiency_at_saturation: f64,
    /// Classification.
    pub class: Scaling,
}

/// Judges a curve of `(threads, ops_per_sec)` points. `None` for fewer than two points or
/// non-positive throughput.
pub fn judge(points: &[(usize, f64)]) -> Option<Verdict> {
    let mut pts: Vec<(usize, f64)> = points.to_vec();
    pts.sort_by_key(|p| p.0);
    if pts.len() < 2 || pts.iter().any(|p| p.1.is_nan() || p.1 <= 0.0) {
        return None;
    }
    let (t0, base) = pts[0];
    let (best_threads, best) =
        pts.iter()
            .copied()
            .fold((t0, base), |acc, p| if p.1 > acc.1 { p } else { acc });
    let saturation = (0..pts.len() - 1)
        .find(|&i| {
            pts[i + 1].1 < pts[i].1 * SATURATION_GAIN
                && pts[i + 1..]
                    .iter()
                    .all(|p| p.1 < pts[i].1 * SATURATION_SLACK)
        })
        .map(|i| pts[i])
        .unwrap_or(*pts.last().expect("two points"));
    let last = *pts.last().expect("two points");
    let max_speedup = best / base;
    let class = if last.1 < best * COLLAPSE_FRACTION {
        Scaling::Collapsing
    } else if max_speedup < SERIALIZED_SPEEDUP {
        Scaling::Serialized
    } else if saturation.0 == last.0 {
        Scaling::Scaling
    } else {
        Scaling::Saturated
    };
    Some(Verdict {
        saturation_threads: saturation.0,
        max_speedup,
        best_threads,
        efficiency_at_saturation: (saturation.1 / base) / (saturation.0 as f64 / t0 as f64),
        class,
    })
}

impl Verdict {
    /// One sentence for the study's output.
    pub fn sentence(&self, last_threads: usize, last_speedup: f64) -> String {
        let (s, b) = (self.saturation_threads, self.best_threads);
        match self.class {
            Scaling::Scaling => format!(
                "still scaling at {last_threads} threads (x{:.2}, {:.0}% efficiency): parallel \
                 execution, the device is not full yet",
                self.max_speedup,
                100.0 * self.efficiency_at_saturation
            ),
            Scaling::Saturated => format!(
                "saturates at {s} threads (more threads add < 10%); max x{:.2} at {b} threads: \
                 parallel execution until the device is full",
                self.max_speedup
            ),
            Scaling::Serialized => format!(
                "does not scale (max x{:.2}): submissions are serialized (one queue or lock), or \
                 one op already fills the device",
                self.max_speedup
            ),
            Scaling::Collapsing => format!(
                "collapses: x{:.2} at {b} threads falls to x{last_speedup:.2} at \
                 {last_threads}: contention costs more than parallelism gains",
                self.max_speedup
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(ys: &[f64]) -> Vec<(usize, f64)> {
        [1, 2, 4, 8, 16]
            .iter()
            .copied()
            .zip(ys.iter().copied())
            .collect()
    }

    #[test]
    fn linear_curve_is_still_scaling() {
        let v = judge(&curve(&[100.0, 200.0, 400.0, 800.0, 1600.0])).unwrap();
        assert_eq!(v.class, Scaling::Scaling);
        assert_eq!(v.saturation_threads, 16);
        assert!((v.max_speedup - 16.0).abs() < 1e-9);
        assert!((v.efficiency_at_saturation - 1.0).abs() < 1e-9);
    }

    #[test]
    fn saturating_curve_reports_the_knee() {
        let v = judge(&curve(&[100.0, 190.0, 205.0, 210.0, 212.0])).unwrap();
        assert_eq!(v.class, Scaling::Saturated);
        assert_eq!(v.saturation_threads, 2);
        assert_eq!(v.best_threads, 16);
        assert!((v.efficiency_at_saturation - 0.95).abs() < 1e-9);
    }

    #[test]
    fn a_dip_is_not_the_knee() {
        // The H100's minimal op in one study: 4 threads no faster than 2, then 8 much faster.
        let v = judge(&curve(&[
            91_582.0, 156_852.0, 155_852.0, 370_005.0, 319_000.0,
        ]))
        .unwrap();
        assert_eq!(v.saturation_threads, 8);
        assert_eq!(v.class, Scaling::Saturated);
    }

    #[test]
    fn flat_curve_is_serialized() {
        let v = judge(&curve(&[100.0, 104.0, 101.0, 99.0, 103.0])).unwrap();
        assert_eq!(v.class, Scaling::Serialized);
        assert_eq!(v.saturation_threads, 1);
    }

    #[test]
    fn falling_curve_is_collapsing() {
        let v = judge(&curve(&[100.0, 180.0, 150.0, 90.0, 40.0])).unwrap();
        assert_eq!(v.class, Scaling::Collapsing);
        assert_eq!(v.best_threads, 2);
        assert!(v.sentence(16, 0.4).contains("collapses"));
    }

    #[test]
    fn degenerate_input_gives_no_verdict() {
        assert!(judge(&[(1, 100.0)]).is_none());
        assert!(judge(&[(1, 0.0), (2, 10.0)]).is_none());
        assert!(judge(&[(1, f64::NAN), (2, 10.0)]).is_none());
    }
}
