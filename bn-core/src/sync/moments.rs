//! The partial statistics a rank contributes, and Chan's merge of them.

use crate::kernels::stats::Moments;

/// Count, mean and sum of squared deviations (`m2`) of one feature's values, in `f64`: the
/// partial statistics a rank contributes. [`merge`](Self::merge) is Chan's parallel formula.
///
/// ```
/// use batchnorm::sync::ChannelMoments;
/// let a = ChannelMoments::of(&[1.0, 2.0]);
/// let b = ChannelMoments::of(&[3.0, 4.0, 5.0]);
/// let all = a.merge(b);
/// assert_eq!((all.count, all.mean, all.m2), (5.0, 3.0, 10.0));
/// assert_eq!(all.variance(), 2.0); // biased: m2 / count
/// assert_eq!(ChannelMoments::EMPTY.merge(a), a);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelMoments {
    /// Number of values.
    pub count: f64,
    /// Their mean (0 when there are none).
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl ChannelMoments {
    /// No values.
    pub const EMPTY: ChannelMoments = ChannelMoments { count: 0.0, mean: 0.0, m2: 0.0 };

    /// The moments of `values` (two passes, for reference and tests).
    pub fn of(values: &[f64]) -> ChannelMoments {
        if values.is_empty() {
            return Self::EMPTY;
        }
        let count = values.len() as f64;
        let mean = values.iter().sum::<f64>() / count;
        let m2 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        ChannelMoments { count, mean, m2 }
    }

    /// Chan's merge of the moments of two disjoint sets. An empty side returns the other exactly.
    pub fn merge(self, other: ChannelMoments) -> ChannelMoments {
        // The kernels' merge of their blocks: one formula for both.
        let of = |m: ChannelMoments| Moments { n: m.count, mean: m.mean, m2: m.m2 };
        let merged = of(self).merge(of(other));
        ChannelMoments { count: merged.n, mean: merged.mean, m2: merged.m2 }
    }

    /// The biased variance `m2 / count` (NaN without values).
    pub fn variance(&self) -> f64 {
        self.m2 / self.count
    }
}
