//! Synchronized batch statistics across processes: data-parallel training where each process
//! (a *rank*) holds a shard of the batch and batch norm uses the statistics of the whole batch
//! (PyTorch's `SyncBatchNorm`, Keras's `synchronized=True`).
//!
//! # How it works
//!
//! - **Partials.** Each rank computes, per feature, the count, mean and sum of squared
//!   deviations of its shard ([`ChannelMoments`], in `f64`) with the layer's own kernels.
//! - **One collective per pass.** The ranks exchange their partials with a [`StatsGroup`], whose
//!   one primitive is an all-gather of a flat `f64` buffer per rank. The buffer starts with a
//!   handshake (the operation, the number of features, the shape, the configuration), so a rank
//!   that disagrees, or that failed its own checks, is reported as an error on **every** rank
//!   instead of leaving the others waiting: a rank whose input is invalid still takes part in the
//!   collective, announcing its failure.
//! - **Merged in rank order, on every rank.** Every rank merges all the partials itself, in rank
//!   order, with Chan's formula: all ranks get bit-identical global statistics, running
//!   statistics and gradients, whatever the transport.
//! - **The layer's contract holds.** Everything is validated before anything is written; after an
//!   `Err` the layer is unchanged. The batch needs at least two values per feature *globally*: a
//!   rank whose shard is empty takes part with a count of zero (PyTorch issues #22192, #74944).
//!   The running statistics use the global count (for the unbiased correction), and
//!   `num_batches_tracked`, the momentum modes, `center`, `scale` and `track_running_stats` work
//!   as in [`BatchNorm::forward_train`].
//!
//! The backward combines `sum(dy)` and `sum(dy * xhat)` the same way and uses the global count
//! in `dx`. Inference ([`BatchNorm::forward_eval`]) is not synchronized (with
//! `track_running_stats = false` it uses the local shard's statistics).
//!
//! Groups: [`LocalGroup`] (one process: the same results as the unsynchronized layer, to
//! rounding), [`ThreadGroup`] (threads standing in for ranks, for tests), and `bn_mpi::MpiGroup`
//! (an MPI communicator) in the `bn-mpi` crate.
//!
//! ```
//! use batchnorm::sync::{SyncBatchNormExt, ThreadGroup};
//! use batchnorm::BatchNorm;
//!
//! // Two ranks, each with a shard of a (4, 2) batch: rows 0..3 and 3..4.
//! let x = [1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0];
//! let shards = [(&x[..6], 3), (&x[6..], 1)];
//! let ranks = ThreadGroup::new(2);
//! let outputs: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .into_iter()
//!         .zip(shards)
//!         .map(|(rank, (shard, n))| {
//!             s.spawn(move || {
//!                 let mut bn = BatchNorm::new(2, [0]).unwrap();
//!                 let mut y = vec![0.0; shard.len()];
//!                 bn.forward_train_sync(shard, &[n, 2], &mut y, &rank).unwrap();
//!                 y
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! // Normalized with the statistics of all four rows: the last row is above the mean.
//! assert!(outputs[1][0] > 1.0 && outputs[1][1] > 1.0);
//! ```

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::kernels::stats::Moments;
use crate::kernels::{self, reference};
use crate::layer::{Scratch, Tail};
use crate::spec::Dynamic;
use crate::{BatchNorm, BatchNormLayer, BnError, Canonical, Element, Param, RunningVar};

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

/// A group of ranks that combine their partial statistics: the transport of synchronized batch
/// norm. Implemented by [`LocalGroup`], [`ThreadRank`] and, in the `bn-mpi` crate, by an MPI
/// communicator.
///
/// The one primitive is a collective all-gather: every rank of the group calls
/// [`all_gather`](Self::all_gather) (the same number of times, in the same order) and every rank
/// gets every rank's buffer, in rank order. Buffers may differ in length between ranks.
/// Synchronized layers call it once per forward and once per backward, whatever their input, so
/// a group never waits for a rank that gave up.
///
/// ```
/// use batchnorm::sync::{LocalGroup, StatsGroup};
/// let group = LocalGroup;
/// assert_eq!((group.rank(), group.size()), (0, 1));
/// assert_eq!(group.all_gather(&[1.0, 2.0])?, vec![vec![1.0, 2.0]]);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait StatsGroup {
    /// This rank's index, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` buffer, in rank order (`size()` buffers). A failure of the transport
    /// is [`BnError::SyncGroup`].
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError>;
}

impl<G: StatsGroup + ?Sized> StatsGroup for &G {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        (**self).all_gather(local)
    }
}

/// The group of one process: synchronized calls give the unsynchronized results (to rounding).
///
/// ```
/// use batchnorm::sync::LocalGroup;
/// use batchnorm::BatchNorm;
/// let mut bn = BatchNorm::new(1, [0])?;
/// let mut y = [0.0; 2];
/// bn.forward_train_sync(&[1.0, 3.0], &[2, 1], &mut y, &LocalGroup)?;
/// assert!((y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalGroup;

impl StatsGroup for LocalGroup {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        Ok(vec![local.to_vec()])
    }
}

/// An in-process group whose ranks are threads: `ThreadGroup::new(n)` gives the `n`
/// [`ThreadRank`]s, one to move into each thread. For tests and for data-parallel training on
/// one machine.
///
/// A rank that is dropped (its thread returned or panicked) leaves the group: the others get
/// [`BnError::SyncGroup`] from their next collective instead of waiting forever.
///
/// ```
/// use batchnorm::sync::{StatsGroup, ThreadGroup};
/// let gathered: Vec<_> = std::thread::scope(|s| {
///     let handles: Vec<_> = ThreadGroup::new(3)
///         .into_iter()
///         .map(|rank| s.spawn(move || rank.all_gather(&[rank.rank() as f64]).unwrap()))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(gathered.iter().all(|g| *g == vec![vec![0.0], vec![1.0], vec![2.0]]));
/// ```
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// The ranks of a new group of `size` threads (none for a size of 0).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Round {
                slots: vec![None; size],
                arrived: 0,
                generation: 0,
                result: Arc::new(Vec::new()),
                left: None,
            }),
            done: Condvar::new(),
        });
        (0..size).map(|rank| ThreadRank { rank, size, shared: Arc::clone(&shared) }).collect()
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
pub struct ThreadRank {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Round>,
    done: Condvar,
}

/// The state of the current all-gather.
#[derive(Debug)]
struct Round {
    /// The buffers of the ranks that arrived.
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Completed rounds; a waiter is released when it changes.
    generation: u64,
    /// The buffers of the last completed round (read by its waiters before the next round can
    /// complete, since that needs them to arrive).
    result: Arc<Vec<Vec<f64>>>,
    /// The first rank that left the group.
    left: Option<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // The lock is never held across user code or a panic site; recover from poisoning anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StatsGroup for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        let left = |r: usize| BnError::SyncGroup(format!("rank {r} left the group"));
        let mut round = self.shared.lock();
        if let Some(r) = round.left {
            return Err(left(r));
        }
        if round.slots[self.rank].is_some() {
            return Err(BnError::SyncGroup(format!("rank {} entered all_gather twice at once", self.rank)));
        }
        round.slots[self.rank] = Some(local.to_vec());
        round.arrived += 1;
        if round.arrived == self.size {
            let all: Vec<Vec<f64>> = round.slots.iter_mut().map(|s| s.take().unwrap_or_default()).collect();
            round.result = Arc::new(all);
            round.arrived = 0;
            round.generation = round.generation.wrapping_add(1);
            self.shared.done.notify_all();
            return Ok(round.result.as_ref().clone());
        }
        let generation = round.generation;
        while round.generation == generation && round.left.is_none() {
            round = self.shared.done.wait(round).unwrap_or_else(|e| e.into_inner());
        }
        if round.generation != generation {
            return Ok(round.result.as_ref().clone());
        }
        // A rank left before this round completed: withdraw (the round can never complete).
        round.slots[self.rank] = None;
        round.arrived -= 1;
        Err(left(round.left.unwrap_or(self.rank)))
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut round = self.shared.lock();
        round.left.get_or_insert(self.rank);
        self.shared.done.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The message every rank contributes to a synchronized pass.

/// First value of every message (catches a buffer that is not ours).
const MAGIC: f64 = 7_240_061.0;
const STATUS_OK: f64 = 0.0;
const STATUS_FAILED: f64 = 1.0;

/// Which pass a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Forward = 1,
    Backward = 2,
}

impl Op {
    fn name(v: f64) -> &'static str {
        match v as i64 {
            1 => "forward_train_sync",
            2 => "backward_sync",
            _ => "an unknown operation",
        }
    }
}

/// What a rank says about its call: the handshake and its payload (`2 C` values).
struct Header {
    channels: usize,
    /// Values per feature on this rank.
    count: f64,
    /// The rank's full shape.
    shape: Vec<usize>,
    /// The axis along which shards may differ.
    batch_axis: usize,
    first_feature_axis: usize,
    /// The layer's element type ([`dtype_code`]).
    dtype: f64,
    /// eps, momentum (-1: cumulative), running_var, center, scale, track_running_stats.
    config: [f64; 6],
}

/// The element type of a layer as a message value.
fn dtype_code(name: &str) -> f64 {
    match name {
        "f32" => 1.0,
        "f64" => 2.0,
        "bf16" => 3.0,
        "f16" => 4.0,
        _ => 0.0,
    }
}

/// The element type a message value names.
fn dtype_name(code: f64) -> &'static str {
    ["an unknown type", "f32", "f64", "bf16", "f16"].get(code as usize).copied().unwrap_or("an unknown type")
}

/// `[MAGIC, op, status, ...]`: `status` OK then `channels, count, batch_axis, first_feature_axis,
/// dtype, config (6), rank r, shape (r), payload`; failed then the error message as bytes.
fn encode(op: Op, local: &Result<(Header, Vec<f64>), BnError>) -> Vec<f64> {
    let mut m = vec![MAGIC, op as i32 as f64];
    match local {
        Ok((h, payload)) => {
            m.push(STATUS_OK);
            m.extend([h.channels as f64, h.count, h.batch_axis as f64, h.first_feature_axis as f64, h.dtype]);
            m.extend(h.config);
            m.push(h.shape.len() as f64);
            m.extend(h.shape.iter().map(|&e| e as f64));
            m.extend_from_slice(payload);
        }
        Err(e) => {
            m.push(STATUS_FAILED);
            m.extend(e.to_string().bytes().map(f64::from));
        }
    }
    m
}

/// A decoded message.
enum Message<'a> {
    Ok { op: f64, header: Header, payload: &'a [f64] },
    Failed { message: String },
}

/// Values before the shape in an OK message.
const FIXED: usize = 3 + 5 + 6 + 1;

fn decode(rank: usize, m: &[f64]) -> Result<Message<'_>, BnError> {
    let malformed =
        || BnError::SyncGroup(format!("rank {rank} sent a malformed message ({} values)", m.len()));
    if m.len() < 3 || m[0] != MAGIC {
        return Err(malformed());
    }
    if m[2] == STATUS_FAILED {
        let bytes: Vec<u8> = m[3..].iter().map(|&b| b as u8).collect();
        let message = String::from_utf8_lossy(&bytes).into_owned();
        return Ok(Message::Failed { message });
    }
    if m[2] != STATUS_OK || m.len() < FIXED {
        return Err(malformed());
    }
    let int =
        |v: f64| if v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53) { Some(v as usize) } else { None };
    let r = int(m[FIXED - 1]).ok_or_else(malformed)?;
    let shape = m.get(FIXED..FIXED + r).ok_or_else(malformed)?;
    let shape: Option<Vec<usize>> = shape.iter().map(|&e| int(e)).collect();
    let header = Header {
        channels: int(m[3]).ok_or_else(malformed)?,
        count: m[4],
        batch_axis: int(m[5]).ok_or_else(malformed)?,
        first_feature_axis: int(m[6]).ok_or_else(malformed)?,
        dtype: m[7],
        config: m[8..14].try_into().map_err(|_| malformed())?,
        shape: shape.ok_or_else(malformed)?,
    };
    if header.batch_axis >= header.shape.len() {
        return Err(malformed());
    }
    Ok(Message::Ok { op: m[1], header, payload: &m[FIXED + r..] })
}

/// The partials of every rank, in rank order, after a successful exchange.
struct Gathered {
    /// Values per feature of each rank.
    counts: Vec<f64>,
    /// Each rank's payload (`2 C` values).
    payloads: Vec<Vec<f64>>,
    /// The global shape: the batch axis' extents summed.
    global_shape: Vec<usize>,
}

/// `shape` with the extent of `batch_axis` set to 0: what every rank's shape must agree on.
fn masked_shape(h: &Header) -> Vec<usize> {
    let mut s = h.shape.clone();
    s[h.batch_axis] = 0;
    s
}

/// Whether two headers describe the same layer and call up to the batch axis' extent.
fn agrees(a: &Header, b: &Header) -> bool {
    a.channels == b.channels
        && a.batch_axis == b.batch_axis
        && a.first_feature_axis == b.first_feature_axis
        && a.dtype.to_bits() == b.dtype.to_bits()
        && masked_shape(a) == masked_shape(b)
        && a.config.map(f64::to_bits) == b.config.map(f64::to_bits)
}

/// The values per feature that a rank's shape holds, `None` when the shape cannot be one of a
/// layer with `channels` features (its size overflows, or is not a multiple of `channels`).
fn values_per_feature(shape: &[usize], channels: usize) -> Option<usize> {
    let len = shape.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e))?;
    if channels == 0 || len % channels != 0 {
        return None;
    }
    Some(len / channels)
}

/// Checks one rank's payload: its `count` is the number of values per feature its own shape
/// holds, and a forward's partials are moments of that many values (a non-negative sum of
/// squared deviations; zeros for an empty shard). Non-finite moments pass: they are the
/// statistics of non-finite data, which the merged statistics report as
/// [`BnError::NonFinite`] on every rank.
fn check_payload(op: Op, h: &Header, payload: &[f64]) -> Result<(), String> {
    let expected = values_per_feature(&h.shape, h.channels)
        .ok_or_else(|| format!("sent shape {:?}, which does not hold {} features", h.shape, h.channels))?;
    // Exact for every count below 2^53, and no shape that fits in memory has more values.
    if h.count != expected as f64 {
        return Err(format!(
            "claims {} values per feature where its shape {:?} holds {expected}",
            h.count, h.shape
        ));
    }
    if payload.len() != 2 * h.channels {
        return Err(format!("sent {} statistics for {} features", payload.len(), h.channels));
    }
    if op == Op::Forward {
        let (means, m2s) = payload.split_at(h.channels);
        for (c, (&mean, &m2)) in means.iter().zip(m2s).enumerate() {
            if m2 < 0.0 {
                return Err(format!("sent a negative sum of squared deviations ({m2}) for feature {c}"));
            }
            if expected == 0 && (mean != 0.0 || m2 != 0.0) {
                return Err(format!(
                    "has an empty shard but sent moments (mean {mean}, m2 {m2}) for feature {c}"
                ));
            }
        }
    }
    Ok(())
}

/// The one collective of a synchronized pass: sends this rank's header and payload (or its
/// failure), gathers everyone's, and checks every message before anything is merged: each
/// rank's call agrees with rank 0's and its payload is consistent with its own header
/// ([`check_payload`]), so every rank reaches the same verdict from the same gathered messages.
/// Rank 0's call must also be this rank's own (else the transport did not deliver what the
/// ranks sent). A rank whose own checks failed returns its own error.
fn exchange<G: StatsGroup + ?Sized>(
    group: &G,
    op: Op,
    local: Result<(Header, Vec<f64>), BnError>,
) -> Result<Gathered, BnError> {
    let all = group.all_gather(&encode(op, &local))?;
    let (mine, _) = local?;
    if all.len() != group.size() || all.is_empty() {
        return Err(BnError::SyncGroup(format!(
            "the group has {} ranks but gathered {} buffers",
            group.size(),
            all.len()
        )));
    }
    let messages = all.iter().enumerate().map(|(r, m)| decode(r, m)).collect::<Result<Vec<_>, _>>()?;
    // A failed rank first (in rank order), then disagreements with rank 0.
    let mut headers: Vec<(f64, &Header, &[f64])> = Vec::with_capacity(messages.len());
    for (rank, m) in messages.iter().enumerate() {
        match m {
            Message::Failed { message } => {
                return Err(BnError::SyncMismatch { rank, message: format!("failed its checks: {message}") })
            }
            Message::Ok { op, header, payload } => headers.push((*op, header, *payload)),
        }
    }
    let (op0, h0, _) = headers[0];
    let mut global_shape = h0.shape.clone();
    global_shape[h0.batch_axis] = 0;
    for (rank, &(op_r, h, payload)) in headers.iter().enumerate() {
        let mismatch = |message: String| Err(BnError::SyncMismatch { rank, message });
        if op_r != op0 {
            return mismatch(format!("calls {} while rank 0 calls {}", Op::name(op_r), Op::name(op0)));
        }
        if h.channels != h0.channels {
            return mismatch(format!("has {} features, rank 0 has {}", h.channels, h0.channels));
        }
        if h.dtype.to_bits() != h0.dtype.to_bits() {
            return mismatch(format!(
                "has a layer of {}, rank 0 of {}",
                dtype_name(h.dtype),
                dtype_name(h0.dtype)
            ));
        }
        let same_layout = h.batch_axis == h0.batch_axis
            && h.first_feature_axis == h0.first_feature_axis
            && masked_shape(h) == masked_shape(h0);
        if !same_layout {
            return mismatch(format!(
                "passes shape {:?} (features from axis {}) and rank 0 {:?} (features from axis {}): \
                 shards may differ only in the extent of the batch axis (axis {})",
                h.shape, h.first_feature_axis, h0.shape, h0.first_feature_axis, h0.batch_axis
            ));
        }
        if h.config.map(f64::to_bits) != h0.config.map(f64::to_bits) {
            return mismatch(format!(
                "has another configuration than rank 0 (eps, momentum, running_var, center, scale, \
                 track_running_stats: {:?} vs {:?})",
                h.config, h0.config
            ));
        }
        if let Err(message) = check_payload(op, h, payload) {
            return mismatch(message);
        }
        global_shape[h0.batch_axis] = global_shape[h0.batch_axis].saturating_add(h.shape[h0.batch_axis]);
    }
    // Every rank agrees with rank 0; rank 0 must agree with this rank's own call, whose
    // features and shape the merge indexes with.
    if op0 != op as i32 as f64 || !agrees(h0, &mine) {
        return Err(BnError::SyncGroup(format!(
            "the gathered messages do not match what rank {} sent: rank 0 calls {} with {} features \
             and shape {:?}, this rank calls {} with {} features and shape {:?}",
            group.rank(),
            Op::name(op0),
            h0.channels,
            h0.shape,
            Op::name(op as i32 as f64),
            mine.channels,
            mine.shape
        )));
    }
    Ok(Gathered {
        counts: headers.iter().map(|(_, h, _)| h.count).collect(),
        payloads: headers.iter().map(|(_, _, p)| p.to_vec()).collect(),
        global_shape,
    })
}

impl<E: Element> BatchNorm<E> {
    /// This layer's handshake for a call with `shape` (already validated) of `dims`.
    fn sync_header(&self, shape: &[usize], dims: Canonical) -> Header {
        let c = &self.config;
        let momentum = if c.get_cumulative_momentum() { -1.0 } else { c.get_momentum() };
        let running_var = match c.get_running_var() {
            RunningVar::Biased => 0.0,
            RunningVar::Unbiased => 1.0,
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        Header {
            channels: dims.channels,
            count: dims.per_channel() as f64,
            shape: shape.to_vec(),
            batch_axis: self.layout().reduced_axes()[0],
            first_feature_axis: self.layout().feature_axes().start,
            dtype: dtype_code(E::NAME),
            config: [
                c.get_eps(),
                momentum,
                running_var,
                flag(c.get_center()),
                flag(c.get_scale()),
                flag(c.get_track_running_stats()),
            ],
        }
    }

    /// Synchronized training forward: normalizes this rank's shard `x` (of shape `shape`) with
    /// the statistics of the whole group's batch, into `y`; updates the running statistics from
    /// them (the unbiased correction uses the global count) and saves them for
    /// [`backward_sync`](Self::backward_sync). Every rank of `group` must call it together;
    /// all get bit-identical statistics.
    ///
    /// Shards may differ only in the extent of the batch axis (the first reduced axis), which
    /// may be 0 on some ranks; the whole batch needs at least two values per feature. Errors:
    /// those of [`forward_train`](Self::forward_train) (about the whole batch where it applies:
    /// [`BnError::TooFewValues`], [`BnError::NonFinite`]), [`BnError::SyncMismatch`] when ranks
    /// disagree or another rank failed, [`BnError::SyncGroup`]. After an `Err` the layer is
    /// unchanged, on every rank.
    ///
    /// ```
    /// use batchnorm::sync::LocalGroup;
    /// use batchnorm::BatchNorm;
    /// let mut bn = BatchNorm::new(2, [0])?;
    /// let (x, mut y) = ([1.0, 10.0, 3.0, 30.0], [0.0; 4]);
    /// bn.forward_train_sync(&x, &[2, 2], &mut y, &LocalGroup)?;
    /// assert_eq!(bn.num_batches_tracked(), 1);
    /// assert!((bn.running_mean()[1] - 2.0).abs() < 1e-6); // 0.9 * 0 + 0.1 * 20
    /// # Ok::<(), batchnorm::BnError>(())
    /// ```
    pub fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        let mut scratch = core::mem::take(&mut self.scratch);
        let result = self.forward_train_sync_with(x, shape, y, group, &mut scratch);
        self.scratch = scratch;
        result
    }

    fn forward_train_sync_with<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        shape: &[usize],
        y: &mut [E],
        group: &G,
        scratch: &mut Scratch,
    ) -> Result<(), BnError> {
        let checked = self.check(shape, &[("x", x.len()), ("y", y.len())]);
        let local = checked.map(|dims| {
            let payload = self.local_moments(x, dims, scratch);
            (self.sync_header(shape, dims), payload)
        });
        let gathered = exchange(group, Op::Forward, local)?;
        // The exchange returned this rank's own error if its checks failed.
        let dims = self.layout().canonical(shape)?;
        let c = dims.channels;
        // Rank order, on every rank: bit-identical results.
        for c in 0..c {
            let mut total = ChannelMoments::EMPTY;
            for (count, p) in gathered.counts.iter().zip(&gathered.payloads) {
                total = total.merge(ChannelMoments { count: *count, mean: p[c], m2: p[c + p.len() / 2] });
            }
            scratch.mean[c] = total.mean;
            scratch.var[c] = total.variance();
        }
        // Every partial passed `check_payload`, so Chan's merge of them cannot go negative; the
        // running variance must never take a negative value, whatever arrived.
        if let Some(c) = scratch.var[..c].iter().position(|&v| v < 0.0) {
            return Err(BnError::SyncGroup(format!(
                "the merged variance of feature {c} is negative ({})",
                scratch.var[c]
            )));
        }
        let n: f64 = gathered.counts.iter().sum();
        if n == 0.0 || c == 0 {
            return Err(BnError::EmptyBatch { shape: gathered.global_shape });
        }
        if n < 2.0 {
            return Err(BnError::TooFewValues { shape: gathered.global_shape });
        }
        let track = self.config.get_track_running_stats();
        self.check_statistics_of(c, n, &scratch.mean, &scratch.var, &mut scratch.inv_std, track)?;
        // Validated: from here on nothing fails.
        let reference_y = if dims.is_empty() { false } else { self.normalize_shard(x, y, dims, scratch) };
        self.commit_train(scratch, n, shape, self.backend(), reference_y);
        Ok(())
    }

    /// The local partials: `[mean (C), m2 (C)]` of this shard (zeros when it is empty), with the
    /// mean and variance left in `scratch`.
    fn local_moments(&self, x: &[E], dims: Canonical, scratch: &mut Scratch) -> Vec<f64> {
        let c = dims.channels;
        let n = dims.per_channel();
        let (mean, var) = (&mut scratch.mean[..c], &mut scratch.var[..c]);
        if n == 0 {
            mean.fill(0.0);
            var.fill(0.0);
        } else {
            match E::slice_as_f32(x) {
                Some(x32) => {
                    kernels::batch_stats::<Dynamic>(self.backend(), x32, dims, mean, var);
                    // The fast kernels sum squared deviations in f32 within a block, which can
                    // overflow where the variance fits: the f64 reference decides (as in
                    // `forward_train`).
                    if mean.iter().chain(var.iter()).any(|v| !v.is_finite()) {
                        reference::batch_stats(x, dims, mean, var);
                    }
                }
                None => reference::batch_stats(x, dims, mean, var),
            }
        }
        let mut payload = Vec::with_capacity(2 * c);
        payload.extend_from_slice(mean);
        payload.extend(var.iter().map(|v| v * n as f64));
        payload
    }

    /// `y` of the shard with the global statistics in `scratch`, and the layer's activation.
    /// Returns whether the reference kernels' formula computed it (else the fast kernels' with
    /// [`kernels::train_coefficients`], which a fused ReLU's backward recomputes).
    fn normalize_shard(&self, x: &[E], y: &mut [E], dims: Canonical, scratch: &Scratch) -> bool {
        let c = dims.channels;
        let p32 = E::Param::slice_as_f32;
        let tail = self.activation_tail();
        match (E::slice_as_f32(x), E::slice_as_f32_mut(y), p32(&self.gamma), p32(&self.beta), tail.epilogue())
        {
            (Some(x), Some(y), Some(gamma), Some(beta), Some(epilogue)) => {
                // The fast kernels' transform: y = (x - m) * s + t, m the mean rounded to f32
                // and t absorbing that rounding.
                let (mut m, mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
                for i in 0..c {
                    (m[i], s[i], t[i]) =
                        kernels::train_coefficients(scratch.mean[i], scratch.inv_std[i], gamma[i], beta[i]);
                }
                kernels::normalize_fused_helped::<Dynamic>(self.backend(), x, y, epilogue, dims, &m, &s, &t);
                false
            }
            _ => {
                let affine = reference::Affine {
                    mean: &scratch.mean[..c],
                    inv_std: &scratch.inv_std[..c],
                    gamma: &self.gamma,
                    beta: &self.beta,
                };
                reference::normalize(x, y, dims, affine);
                tail.apply(y);
                true
            }
        }
    }

    /// Synchronized backward of the last [`forward_train_sync`](Self::forward_train_sync):
    /// combines `sum(dy)` and `sum(dy * xhat)` over the group (in rank order, bit-identical on
    /// every rank), writes this shard's `dx` (with the global count) and stores the global
    /// sums as `gamma_grad()` / `beta_grad()`. Every rank must call it together, with the shape
    /// of its last synchronized forward.
    ///
    /// Errors: those of [`backward`](Self::backward), [`BnError::SyncMismatch`] when ranks
    /// disagree, another rank failed, or the last forward was not synchronized over this group,
    /// and [`BnError::SyncGroup`]. After an `Err` the layer is unchanged.
    ///
    /// ```
    /// use batchnorm::sync::LocalGroup;
    /// use batchnorm::BatchNorm;
    /// let mut bn = BatchNorm::new(1, [0])?;
    /// let (x, mut y, mut dx) = ([1.0, 3.0], [0.0; 2], [0.0; 2]);
    /// bn.forward_train_sync(&x, &[2, 1], &mut y, &LocalGroup)?;
    /// bn.backward_sync(&x, &[1.0, 1.0], &[2, 1], &mut dx, &LocalGroup)?;
    /// assert_eq!(bn.beta_grad(), &[2.0]);
    /// assert!(dx.iter().all(|d| d.abs() < 1e-6)); // a constant dy has no gradient through x
    /// # Ok::<(), batchnorm::BnError>(())
    /// ```
    pub fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        group: &G,
    ) -> Result<(), BnError> {
        let mut grad = core::mem::take(&mut self.grad);
        let result = self.backward_sync_with(x, dy, shape, dx, group, &mut grad);
        self.grad = grad;
        result
    }

    /// [`backward_sync`](Self::backward_sync), with the layer's buffer for a fused ReLU's
    /// masked gradient taken out.
    fn backward_sync_with<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[E],
        dy: &[E],
        shape: &[usize],
        dx: &mut [E],
        group: &G,
        grad: &mut Vec<E>,
    ) -> Result<(), BnError> {
        let checked =
            self.check(shape, &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())]).and_then(|dims| {
                if !self.saved.valid {
                    return Err(BnError::NoForward);
                }
                if self.saved.shape != shape {
                    return Err(BnError::BackwardShape {
                        expected: self.saved.shape.clone(),
                        got: shape.to_vec(),
                    });
                }
                Ok(dims)
            });
        // With a fused ReLU, the gradient that reaches the normalization is dy masked by the
        // forward's y > 0 (recomputed from x with that forward's arithmetic).
        let tail = self.activation_tail();
        let dy: &[E] = match (&checked, tail) {
            (Ok(dims), Tail::Relu) => {
                let masked = Self::mask_buffer(grad, None, dims.len());
                let mut coefficients = Vec::new();
                self.train_mask::<Dynamic>(x, dy, masked, *dims, tail, &mut coefficients);
                masked
            }
            _ => dy,
        };
        let local = checked.map(|dims| (self.sync_header(shape, dims), self.local_sums(x, dy, dims)));
        let gathered = exchange(group, Op::Backward, local)?;
        // The exchange returned this rank's own error if its checks failed.
        let dims = self.layout().canonical(shape)?;
        let c = dims.channels;
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        for p in &gathered.payloads {
            for i in 0..c {
                sum_dy[i] += p[i];
                sum_dy_xhat[i] += p[c + i];
            }
        }
        let n: f64 = gathered.counts.iter().sum();
        if n != self.saved.count {
            return Err(BnError::SyncMismatch {
                rank: group.rank(),
                message: format!(
                    "differentiates a forward of {} values per feature but the group's batch has {n}: \
                     backward_sync must follow forward_train_sync over the same group",
                    self.saved.count
                ),
            });
        }
        // Validated: from here on nothing fails.
        if !dims.is_empty() {
            let saved = &self.saved;
            match (E::slice_as_f32(x), E::slice_as_f32(dy), E::slice_as_f32_mut(dx), p32(&saved.gamma)) {
                (Some(x), Some(dy), Some(dx), Some(gamma)) => kernels::backward_dx::<Dynamic>(
                    self.backend(),
                    x,
                    dy,
                    dx,
                    dims,
                    n,
                    &saved.mean,
                    &saved.inv_std,
                    gamma,
                    &sum_dy,
                    &sum_dy_xhat,
                ),
                _ => reference::backward_train_dx_with_count(
                    x,
                    dy,
                    dx,
                    dims,
                    n,
                    &saved.mean,
                    &saved.inv_std,
                    &saved.gamma,
                    &sum_dy,
                    &sum_dy_xhat,
                ),
            }
        }
        self.store_grads(&sum_dy, &sum_dy_xhat);
        Ok(())
    }

    /// The local backward sums `[sum(dy) (C), sum(dy * xhat) (C)]` with the saved statistics.
    fn local_sums(&self, x: &[E], dy: &[E], dims: Canonical) -> Vec<f64> {
        let c = dims.channels;
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
        if !dims.is_empty() {
            let (mean, inv_std) = (&self.saved.mean, &self.saved.inv_std);
            match (E::slice_as_f32(x), E::slice_as_f32(dy)) {
                (Some(x), Some(dy)) => kernels::backward_sums::<Dynamic>(
                    self.backend(),
                    x,
                    dy,
                    dims,
                    mean,
                    inv_std,
                    &mut sum_dy,
                    &mut sum_dy_xhat,
                ),
                _ => reference::backward_sums(x, dy, dims, mean, inv_std, &mut sum_dy, &mut sum_dy_xhat),
            }
        }
        sum_dy.extend(sum_dy_xhat);
        sum_dy
    }
}

fn p32<P: Param>(values: &[P]) -> Option<&[f32]> {
    P::slice_as_f32(values)
}

/// Synchronized training for every layer: the `#[batch_norm]` layers and [`BatchNorm`] (through
/// [`BatchNormLayer::as_batch_norm_mut`]). See [`BatchNorm::forward_train_sync`] and
/// [`BatchNorm::backward_sync`].
///
/// ```
/// use batchnorm::sync::{LocalGroup, SyncBatchNormExt};
/// use batchnorm::{BatchNorm, BatchNormLayer};
///
/// fn step<L: BatchNormLayer<Elem = f32>>(layer: &mut L, x: &[f32], shape: &[usize]) -> Vec<f32> {
///     let mut y = vec![0.0; x.len()];
///     layer.forward_train_sync(x, shape, &mut y, &LocalGroup).expect("valid batch");
///     y
/// }
/// let mut bn = BatchNorm::new(1, [0])?;
/// assert!(step(&mut bn, &[0.0, 2.0], &[2, 1])[1] > 0.99);
/// # Ok::<(), batchnorm::BnError>(())
/// ```
pub trait SyncBatchNormExt: BatchNormLayer {
    /// See [`BatchNorm::forward_train_sync`].
    fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError>;

    /// See [`BatchNorm::backward_sync`].
    fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError>;
}

impl<L: BatchNormLayer + ?Sized> SyncBatchNormExt for L {
    fn forward_train_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        shape: &[usize],
        y: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().forward_train_sync(x, shape, y, group)
    }

    fn backward_sync<G: StatsGroup + ?Sized>(
        &mut self,
        x: &[Self::Elem],
        dy: &[Self::Elem],
        shape: &[usize],
        dx: &mut [Self::Elem],
        group: &G,
    ) -> Result<(), BnError> {
        self.as_batch_norm_mut().backward_sync(x, dy, shape, dx, group)
    }
}
