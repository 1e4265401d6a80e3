//! The message every rank contributes to a synchronized pass: its format, and the checks every
//! rank applies to all of them before anything is merged.

use super::group::StatsGroup;
use crate::BnError;

/// First value of every message (catches a buffer that is not ours).
const MAGIC: f64 = 7_240_061.0;
const STATUS_OK: f64 = 0.0;
const STATUS_FAILED: f64 = 1.0;

/// Which pass a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Op {
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
pub(super) struct Header {
    pub(super) channels: usize,
    /// Values per feature on this rank.
    pub(super) count: f64,
    /// The rank's full shape.
    pub(super) shape: Vec<usize>,
    /// The axis along which shards may differ.
    pub(super) batch_axis: usize,
    pub(super) first_feature_axis: usize,
    /// The layer's element type ([`dtype_code`]).
    pub(super) dtype: f64,
    /// eps, momentum (-1: cumulative), running_var, center, scale, track_running_stats.
    pub(super) config: [f64; 6],
}

/// The element type of a layer as a message value.
pub(super) fn dtype_code(name: &str) -> f64 {
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
pub(super) struct Gathered {
    /// Values per feature of each rank.
    pub(super) counts: Vec<f64>,
    /// Each rank's payload (`2 C` values).
    pub(super) payloads: Vec<Vec<f64>>,
    /// The global shape: the batch axis' extents summed.
    pub(super) global_shape: Vec<usize>,
}

/// `shape` with the extent of `batch_axis` set to 0: what every rank's shape must agree on.
fn masked_shape(h: &Header) -> Vec<usize> {
    let mut s = h.shape.clone();
    s[h.batch_axis] = 0;
    s
}

/// How the call `h` differs from rank 0's `h0` (features, element type, shape up to the batch
/// axis' extent, configuration), said from `h`'s side; `None` when they agree.
fn disagreement(h: &Header, h0: &Header) -> Option<String> {
    if h.channels != h0.channels {
        return Some(format!("has {} features, rank 0 has {}", h.channels, h0.channels));
    }
    if h.dtype.to_bits() != h0.dtype.to_bits() {
        return Some(format!("has a layer of {}, rank 0 of {}", dtype_name(h.dtype), dtype_name(h0.dtype)));
    }
    let same_layout = h.batch_axis == h0.batch_axis
        && h.first_feature_axis == h0.first_feature_axis
        && masked_shape(h) == masked_shape(h0);
    if !same_layout {
        return Some(format!(
            "passes shape {:?} (features from axis {}) and rank 0 {:?} (features from axis {}): \
             shards may differ only in the extent of the batch axis (axis {})",
            h.shape, h.first_feature_axis, h0.shape, h0.first_feature_axis, h0.batch_axis
        ));
    }
    if h.config.map(f64::to_bits) != h0.config.map(f64::to_bits) {
        return Some(format!(
            "has another configuration than rank 0 (eps, momentum, running_var, center, scale, \
             track_running_stats: {:?} vs {:?})",
            h.config, h0.config
        ));
    }
    None
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
pub(super) fn exchange<G: StatsGroup + ?Sized>(
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
        if let Some(message) = disagreement(h, h0) {
            return mismatch(message);
        }
        if let Err(message) = check_payload(op, h, payload) {
            return mismatch(message);
        }
        global_shape[h0.batch_axis] = global_shape[h0.batch_axis].saturating_add(h.shape[h0.batch_axis]);
    }
    // Every rank agrees with rank 0; rank 0 must agree with this rank's own call, whose
    // features and shape the merge indexes with.
    if op0 != op as i32 as f64 || disagreement(h0, &mine).is_some() {
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
