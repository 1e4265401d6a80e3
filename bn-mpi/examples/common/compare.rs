//! The synchronized-vs-whole-batch comparison, for any [`StatsGroup`]: the `sync_bn` example
//! runs it on MPI ranks, the crate's tests on the in-process thread group.
//!
//! Every rank generates the whole batch deterministically, trains one layer on its shard with
//! synchronized statistics and one layer on the whole batch alone, and compares: its shard of
//! the outputs and input gradients, the running statistics and the parameter gradients (within
//! `1e-5 + 1e-4 |b|`), and that every rank's state is bit-identical to rank 0's (gathered).

use batchnorm::{batch_norm, BatchNorm, BatchNormLayer, BnError, Config, Element, Layout, Param, Preset};
use bn_mpi::{StatsGroup, SyncBatchNormExt};

/// Batch extent of rank `r`'s shard: uneven, and empty on rank 1.
pub fn shard_size(r: usize) -> usize {
    [3, 0, 2, 5, 1, 4][r % 6]
}

/// A deterministic value in [lo, hi) for index `i` of stream `seed` (SplitMix64).
fn value(seed: u64, i: usize, lo: f64, hi: f64) -> f64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    lo + (hi - lo) * ((z >> 11) as f64 / (1u64 << 53) as f64)
}

fn data<E: Element>(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<E> {
    (0..n).map(|i| E::from_f64(value(seed, i, lo, hi))).collect()
}

fn param_data<P: Param>(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<P> {
    (0..n).map(|i| P::from_f64(value(seed, i, lo, hi))).collect()
}

fn close(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // NaN fails too.
        let within = (g - w).abs() <= 1e-5 + 1e-4 * w.abs();
        if !within {
            return Err(format!("{what}[{i}]: got {g:e}, expected {w:e}"));
        }
    }
    Ok(())
}

fn f64s<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.into()).collect()
}

fn elems<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

fn params<P: Param>(v: &[P]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Trains `make()` for three steps on rank `group.rank()`'s shard (synchronized) and on the
/// whole batch (alone), and compares. `shape` is the whole batch's shape (batch axis 0).
fn case<L: BatchNormLayer, G: StatsGroup>(
    name: &str,
    group: &G,
    make: impl Fn() -> L,
    shape: &[usize],
) -> Result<(), String> {
    let (rank, size) = (group.rank(), group.size());
    let sizes: Vec<usize> = (0..size).map(shard_size).collect();
    let mut shape = shape.to_vec();
    shape[0] = sizes.iter().sum();
    let row: usize = shape[1..].iter().product();
    let start: usize = sizes[..rank].iter().sum();
    let span = start * row..(start + sizes[rank]) * row;
    let mut local_shape = shape.clone();
    local_shape[0] = sizes[rank];
    let (mut sync, mut full) = (make(), make());
    let c = sync.features();
    let fail = |what: &str, e: BnError| format!("{name}: {what}: {e}");
    for step in 0..3u64 {
        let seed = 1000 * step + name.len() as u64;
        let x: Vec<L::Elem> = data(seed, shape[0] * row, -2.0, 6.0);
        let dy: Vec<L::Elem> = data(seed + 1, x.len(), -1.0, 1.0);
        let (gamma, beta): (Vec<L::Param>, Vec<L::Param>) =
            (param_data(seed + 2, c, 0.5, 1.5), param_data(seed + 3, c, -0.5, 0.5));
        for bn in [&mut sync, &mut full] {
            bn.update_params(&gamma, &beta).map_err(|e| fail("update_params", e))?;
        }
        let zero = L::Elem::from_f64(0.0);
        let (mut y_full, mut dx_full) = (vec![zero; x.len()], vec![zero; x.len()]);
        full.forward_train(&x, &shape, &mut y_full).map_err(|e| fail("forward_train", e))?;
        full.backward(&x, &dy, &shape, &mut dx_full).map_err(|e| fail("backward", e))?;
        let (xs, dys) = (&x[span.clone()], &dy[span.clone()]);
        let (mut y, mut dx) = (vec![zero; xs.len()], vec![zero; xs.len()]);
        sync.forward_train_sync(xs, &local_shape, &mut y, group)
            .map_err(|e| fail("forward_train_sync", e))?;
        sync.backward_sync(xs, dys, &local_shape, &mut dx, group).map_err(|e| fail("backward_sync", e))?;
        let at = |what: &str| format!("{name} step {step} rank {rank}: {what}");
        close(&at("y"), &elems(&y), &elems(&y_full[span.clone()]))?;
        close(&at("dx"), &elems(&dx), &elems(&dx_full[span.clone()]))?;
        close(&at("running_mean"), &params(sync.running_mean()), &params(full.running_mean()))?;
        close(&at("running_var"), &params(sync.running_var()), &params(full.running_var()))?;
        close(&at("gamma_grad"), &params(sync.gamma_grad()), &params(full.gamma_grad()))?;
        close(&at("beta_grad"), &params(sync.beta_grad()), &params(full.beta_grad()))?;
    }
    // Bit-identical state on every rank: gather it and compare the bits with rank 0's.
    let mut state = Vec::new();
    for p in [sync.running_mean(), sync.running_var(), sync.gamma_grad(), sync.beta_grad()] {
        state.extend(params(p));
    }
    state.push(sync.num_batches_tracked() as f64);
    let all = group.all_gather(&state).map_err(|e| fail("all_gather", e))?;
    for (r, s) in all.iter().enumerate() {
        if f64s(s).iter().map(|v| v.to_bits()).ne(all[0].iter().map(|v| v.to_bits())) {
            return Err(format!("{name}: rank {r}'s state is not bit-identical to rank 0's"));
        }
    }
    Ok(())
}

#[batch_norm(features = 6, axes = [0, 2, 3], preset = "pytorch")]
struct PlanesBn;

/// Every comparison; the names of those that passed, or the first failure.
pub fn run_all<G: StatsGroup>(group: &G) -> Result<Vec<&'static str>, String> {
    let mut passed = Vec::new();
    case("macro NCHW (N, 6, 5, 5) f32", group, PlanesBn::new, &[0, 6, 5, 5])?;
    passed.push("macro NCHW (N, 6, 5, 5) f32");
    let rows = || BatchNorm::with_config(33, [0], Config::preset(Preset::Keras)).unwrap();
    case("runtime NC (N, 33) f32", group, rows, &[0, 33])?;
    passed.push("runtime NC (N, 33) f32");
    let nhwc = || {
        BatchNorm::with_config(16, [0, 1, 2], Config::preset(Preset::Pytorch).cumulative_momentum()).unwrap()
    };
    case("runtime NHWC (N, 4, 4, 16) f32", group, nhwc, &[0, 4, 4, 16])?;
    passed.push("runtime NHWC (N, 4, 4, 16) f32");
    let f64_layer = || {
        BatchNorm::<f64>::with_layout(
            Layout::from_axes(&[5], &[0, 2]).unwrap(),
            Config::preset(Preset::Pytorch),
        )
        .unwrap()
    };
    case("runtime (N, 5, 9) f64", group, f64_layer, &[0, 5, 9])?;
    passed.push("runtime (N, 5, 9) f64");
    mismatch(group)?;
    passed.push("mismatched features: an error on every rank");
    Ok(passed)
}

/// The last rank passes another number of features: every rank gets an error, none hangs, and
/// every layer is unchanged.
fn mismatch<G: StatsGroup>(group: &G) -> Result<(), String> {
    if group.size() < 2 {
        return Ok(());
    }
    let last = group.size() - 1;
    let c = if group.rank() == last { 4 } else { 3 };
    let mut bn = BatchNorm::new(c, [0]).unwrap();
    let x = vec![1.0f32; 2 * c];
    let mut y = vec![0.0; x.len()];
    match bn.forward_train_sync(&x, &[2, c], &mut y, group) {
        Err(BnError::SyncMismatch { rank, .. }) if rank == last && bn.num_batches_tracked() == 0 => Ok(()),
        other => Err(format!("mismatched features: rank {} got {other:?}", group.rank())),
    }
}
