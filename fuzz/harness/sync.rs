//! Fuzz harness for synchronized training (`bn_core::sync`): the messages of the other ranks
//! of a [`StatsGroup`] are arbitrary, recorded from honest ranks, or honest ones mutated
//! (a field replaced, truncated, extended, another layer's message), and this rank's own
//! message may be altered on its way back. The properties:
//!
//! - no panic, in the forward and in the backward that follows a successful forward;
//! - honest messages from ranks that agree give `Ok`;
//! - after an `Err` the layer is bit-for-bit unchanged;
//! - after `Ok` the running statistics are finite and the running variance is not negative.
//!
//! The same file is compiled into the fuzz target and into `tests/integration/fuzz_regressions.rs`.
#![allow(dead_code)]

use std::cell::RefCell;

use bn_core::sync::StatsGroup;
use bn_core::{BatchNorm, BnError, Config, Layout, Preset};

/// The fuzzer's bytes, read front to back; zeros once they run out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.u8() as usize % n
        }
    }
    fn f64(&mut self) -> f64 {
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|v| *v = self.u8());
        f64::from_le_bytes(b)
    }
    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Values a buggy or hostile peer might put in any field.
const ODD: [f64; 14] = [
    -1.0,
    0.0,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    1e300,
    -1e300,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    9007199254740992.0,    // 2^53
    1152921504606846976.0, // 2^60
];

/// A group of `size` ranks, this one `rank`, whose all-gather returns `messages` with this
/// rank's own message (possibly altered by `own`) at its place, and records what was sent.
struct Scripted<'a> {
    rank: usize,
    size: usize,
    messages: &'a [Vec<f64>],
    own: &'a dyn Fn(&[f64]) -> Vec<f64>,
    sent: RefCell<Vec<f64>>,
}

impl StatsGroup for Scripted<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        *self.sent.borrow_mut() = local.to_vec();
        let mut all = self.messages.to_vec();
        all.insert(self.rank.min(all.len()), (self.own)(local));
        Ok(all)
    }
}

/// The observable state of a layer, as bits.
fn state(bn: &BatchNorm) -> Vec<u64> {
    let parts = [bn.gamma(), bn.beta(), bn.running_mean(), bn.running_var(), bn.gamma_grad(), bn.beta_grad()];
    let mut bits: Vec<u64> = parts.iter().flat_map(|p| p.iter().map(|v| v.to_bits() as u64)).collect();
    bits.push(bn.num_batches_tracked());
    bits
}

/// The message an honest rank with `layer`'s configuration sends for a shard `x` of `shape`.
fn honest_message(layer: &BatchNorm, x: &[f32], shape: &[usize]) -> Vec<f64> {
    let group =
        Scripted { rank: 0, size: 1, messages: &[], own: &|m| m.to_vec(), sent: RefCell::new(Vec::new()) };
    let mut peer = layer.clone();
    let mut y = vec![0.0; x.len()];
    let _ = peer.forward_train_sync(x, shape, &mut y, &group);
    group.sent.into_inner()
}

/// A shard of `rows` rows of `shape` (batch axis 0) with values from the input.
fn shard(input: &mut Input, shape: &[usize]) -> Vec<f32> {
    let len: usize = shape.iter().product();
    (0..len).map(|_| (input.u8() as f32 - 128.0) * 0.25).collect()
}

pub fn run(data: &[u8]) {
    let input = &mut Input { data, pos: 0 };
    // The layer: NC or NCL, a few features, one of the configurations.
    let features = 1 + input.below(4);
    let ncl = input.u8() & 1 == 1;
    let axes: &[usize] = if ncl { &[0, 2] } else { &[0] };
    let config = match input.below(3) {
        0 => Config::new(),
        1 => Config::preset(Preset::Pytorch),
        _ => Config::preset(Preset::Keras).track_running_stats(false),
    };
    let layout = Layout::from_axes(&[features], axes).expect("valid layout");
    let mut bn = BatchNorm::with_layout(layout, config).expect("valid layer");
    let shape_of = |rows: usize| if ncl { vec![rows, features, 3] } else { vec![rows, features] };

    let size = 1 + input.below(4);
    let rank = input.below(size);
    let rows = input.below(5);
    let shape = shape_of(rows);
    let x = shard(input, &shape);

    // The other ranks' messages.
    let mut honest = true;
    let mut messages = Vec::new();
    for _ in 1..size {
        let peer_shape = shape_of(input.below(5));
        let peer_x = shard(input, &peer_shape);
        let mut m = honest_message(&bn, &peer_x, &peer_shape);
        match input.below(8) {
            0..=3 => {}
            4 => {
                let at = input.below(m.len().max(1));
                if let Some(v) = m.get_mut(at) {
                    *v = ODD[input.below(ODD.len())];
                    honest = false;
                }
            }
            5 => {
                let keep = input.below(m.len() + 1);
                m.truncate(keep);
                honest = false;
            }
            6 => {
                let other = BatchNorm::new(1 + input.below(6), [0]).expect("valid layer");
                let other_shape = [input.below(4), other.features()];
                let other_x = shard(input, &other_shape);
                m = honest_message(&other, &other_x, &other_shape);
                honest = false;
            }
            _ => {
                let len = input.below(40);
                m = (0..len)
                    .map(|_| if input.u8() & 1 == 0 { input.f64() } else { ODD[input.below(14)] })
                    .collect();
                honest = false;
            }
        }
        messages.push(m);
    }
    // This rank's own message as the transport returns it.
    let own_at = input.below(64);
    let own_value = ODD[input.below(ODD.len())];
    let altered = own_at < 24 && !input.exhausted();
    let own = move |m: &[f64]| {
        let mut m = m.to_vec();
        if altered {
            if let Some(v) = m.get_mut(own_at) {
                *v = own_value;
            }
        }
        m
    };
    let group = Scripted { rank, size, messages: &messages, own: &own, sent: RefCell::new(Vec::new()) };

    let before = state(&bn);
    let mut y = vec![0.0; x.len()];
    let result = bn.forward_train_sync(&x, &shape, &mut y, &group);
    match &result {
        Err(_) => assert_eq!(state(&bn), before, "the layer changed after {result:?}"),
        Ok(()) => {
            assert!(bn.running_mean().iter().all(|v| v.is_finite()), "{:?}", bn.running_mean());
            assert!(bn.running_var().iter().all(|v| v.is_finite() && *v >= 0.0), "{:?}", bn.running_var());
        }
    }
    // Honest messages of ranks that agree: the only errors are the batch's own (too few
    // values or an empty batch over the whole group).
    if honest && !altered {
        if let Err(e) = &result {
            assert!(matches!(e, BnError::TooFewValues { .. } | BnError::EmptyBatch { .. }), "{e:?}");
        }
    }
    if result.is_ok() {
        let dy = shard(input, &shape);
        let mut dx = vec![0.0; x.len()];
        let before = state(&bn);
        let backward = bn.backward_sync(&x, &dy, &shape, &mut dx, &group);
        if backward.is_err() {
            assert_eq!(state(&bn), before, "the layer changed after {backward:?}");
        }
    }
}
