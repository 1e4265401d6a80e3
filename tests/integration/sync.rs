//! Synchronized batch statistics (`batchnorm::sync`) on the in-process group of threads: a
//! group of 2, 3 and 4 ranks with uneven and empty shards gives the outputs, running statistics
//! and gradients of one process on the concatenated batch, bit-identical state on every rank,
//! and an error on every rank (never a hang) when ranks disagree or one of them fails.

use crate::common;

use batchnorm::sync::{LocalGroup, StatsGroup, SyncBatchNormExt, ThreadGroup, ThreadRank};
use batchnorm::{batch_norm, Activation, BatchNorm, BnError, Config, Element, Layout, Param, Preset};
use common::{assert_close, full_state, Rng, State, FWD};

/// Runs `f(rank)` on one thread per rank of a new group of `size`; results in rank order.
fn on_ranks<T: Send>(size: usize, f: impl Fn(ThreadRank) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> =
            ThreadGroup::new(size).into_iter().map(|rank| s.spawn(move || f(rank))).collect();
        handles.into_iter().map(|h| h.join().expect("rank panicked")).collect()
    })
}

/// The shard of rank `r` (batch extents `sizes`) of a tensor whose batch axis is axis 0.
fn shard<E: Copy>(full: &[E], sizes: &[usize], r: usize, row: usize) -> Vec<E> {
    let start: usize = sizes[..r].iter().sum();
    full[start * row..(start + sizes[r]) * row].to_vec()
}

/// What one rank ends with after `steps` synchronized training steps.
struct RankResult<E: Element> {
    y: Vec<E>,
    dx: Vec<E>,
    state: (State, u64),
}

/// Trains one layer per rank on shards of `x` (rows of `shape[1..]`) and one layer on the whole
/// batch, for `steps` steps (forward + backward, with a parameter update between steps), and
/// compares: outputs and input gradients per shard, running statistics and parameter gradients.
fn check_against_full<E: Element>(
    make: &(dyn Fn() -> BatchNorm<E> + Sync),
    shape: &[usize],
    sizes: &[usize],
    seed: u64,
) {
    let total: usize = sizes.iter().sum();
    assert_eq!(total, shape[0]);
    let row: usize = shape[1..].iter().product();
    let mut rng = Rng::new(seed);
    let steps = 3;
    let xs: Vec<Vec<E>> = (0..steps).map(|_| rng.vec(total * row, -2.0, 5.0)).collect();
    let dys: Vec<Vec<E>> = (0..steps).map(|_| rng.vec(total * row, -1.0, 1.0)).collect();
    let c = make().features();
    type Params<P> = Vec<(Vec<P>, Vec<P>)>;
    let params: Params<E::Param> =
        (0..steps).map(|_| (rng.params(c, 0.5, 1.5), rng.params(c, -0.5, 0.5))).collect();
    let config = *make().config();
    let set = |bn: &mut BatchNorm<E>, step: usize| {
        let (g, b) = &params[step];
        let one = vec![E::Param::from_f64(1.0); c];
        let zero = vec![E::Param::from_f64(0.0); c];
        let g = if config.get_scale() { g } else { &one };
        let b = if config.get_center() { b } else { &zero };
        bn.update_params(g, b).unwrap();
    };

    // One process on the whole batch.
    let mut full = make();
    let (mut y_full, mut dx_full) = (Vec::new(), Vec::new());
    for step in 0..steps {
        set(&mut full, step);
        let mut y = vec![E::from_f64(0.0); xs[step].len()];
        full.forward_train(&xs[step], shape, &mut y).unwrap();
        let mut dx = vec![E::from_f64(0.0); xs[step].len()];
        full.backward(&xs[step], &dys[step], shape, &mut dx).unwrap();
        (y_full, dx_full) = (y, dx);
    }

    let results = on_ranks(sizes.len(), |rank| {
        let r = rank.rank();
        let mut local_shape = shape.to_vec();
        local_shape[0] = sizes[r];
        let mut bn = make();
        let mut out = None;
        for step in 0..steps {
            set(&mut bn, step);
            let x = shard(&xs[step], sizes, r, row);
            let dy = shard(&dys[step], sizes, r, row);
            let mut y = vec![E::from_f64(f64::NAN); x.len()];
            bn.forward_train_sync(&x, &local_shape, &mut y, &rank).unwrap();
            let mut dx = vec![E::from_f64(f64::NAN); x.len()];
            bn.backward_sync(&x, &dy, &local_shape, &mut dx, &rank).unwrap();
            out = Some((y, dx));
        }
        let (y, dx) = out.unwrap();
        RankResult { y, dx, state: full_state(&bn) }
    });

    let what = |s: &str| format!("{} {shape:?} {sizes:?} {config:?}: {s}", E::NAME);
    for (r, res) in results.iter().enumerate() {
        assert_eq!(
            res.state,
            results[0].state,
            "{}",
            what(&format!("rank {r}'s state differs from rank 0's"))
        );
        let e64 = |v: &[E]| v.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
        let (y, dx) = (shard(&y_full, sizes, r, row), shard(&dx_full, sizes, r, row));
        assert_close(&what(&format!("y of rank {r}")), &e64(&res.y), &e64(&y), FWD);
        assert_close(&what(&format!("dx of rank {r}")), &e64(&res.dx), &e64(&dx), FWD);
    }
    let bn0 = &results[0].state;
    assert_eq!(bn0.1, full.num_batches_tracked(), "{}", what("num_batches_tracked"));
    let f64s = |bits: &[u64]| bits.iter().map(|&b| f64::from_bits(b)).collect::<Vec<f64>>();
    let p64 = |p: &[E::Param]| p.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
    assert_close(&what("running_mean"), &f64s(&bn0.0.running_mean), &p64(full.running_mean()), FWD);
    assert_close(&what("running_var"), &f64s(&bn0.0.running_var), &p64(full.running_var()), FWD);
    assert_close(&what("gamma_grad"), &f64s(&bn0.0.gamma_grad), &p64(full.gamma_grad()), FWD);
    assert_close(&what("beta_grad"), &f64s(&bn0.0.beta_grad), &p64(full.beta_grad()), FWD);
}

/// Uneven shards with an empty one, for 2, 3 and 4 ranks.
const SPLITS: [&[usize]; 5] = [&[3, 1], &[0, 4], &[2, 0, 5], &[1, 4, 0, 2], &[1, 1, 1, 1]];

#[test]
fn planes_match_one_process_on_the_whole_batch() {
    for (k, sizes) in SPLITS.iter().enumerate() {
        let n: usize = sizes.iter().sum();
        let make = || BatchNorm::with_config(5, [0, 2, 3], Config::preset(Preset::Pytorch)).unwrap();
        check_against_full::<f32>(&make, &[n, 5, 3, 4], sizes, k as u64);
    }
}

#[test]
fn rows_match_one_process_on_the_whole_batch() {
    for (k, sizes) in SPLITS.iter().enumerate() {
        let n: usize = sizes.iter().sum();
        // Rows of 7 channels (virtual rows of 112), and NHWC (N, H, W, C).
        let make = || BatchNorm::with_config(7, [0], Config::preset(Preset::Keras)).unwrap();
        check_against_full::<f32>(&make, &[n, 7], sizes, 10 + k as u64);
        let make = || BatchNorm::with_config(16, [0, 1, 2], Config::preset(Preset::Pytorch)).unwrap();
        check_against_full::<f32>(&make, &[n, 3, 2, 16], sizes, 20 + k as u64);
    }
}

#[test]
fn larger_batches_use_the_parallel_kernels() {
    // Enough values for the pool, several chunks per channel, on uneven shards.
    let make = || BatchNorm::with_config(8, [0, 2, 3], Config::preset(Preset::Pytorch)).unwrap();
    check_against_full::<f32>(&make, &[24, 8, 32, 32], &[10, 0, 14], 40);
    let make = || BatchNorm::with_config(96, [0], Config::preset(Preset::Pytorch)).unwrap();
    check_against_full::<f32>(&make, &[3000, 96], &[1000, 1999, 1], 41);
}

#[test]
fn every_configuration_is_respected() {
    let configs = [
        Config::new(),
        Config::preset(Preset::Pytorch).cumulative_momentum(),
        Config::preset(Preset::Keras).center(false),
        Config::preset(Preset::Pytorch).scale(false),
        Config::preset(Preset::Pytorch).track_running_stats(false),
        Config::new().momentum(0.0).eps(1e-3),
        Config::preset(Preset::Pytorch).activation(Activation::Relu),
    ];
    for (k, config) in configs.into_iter().enumerate() {
        let make = || BatchNorm::with_config(3, [0, 2], config).unwrap();
        check_against_full::<f32>(&make, &[6, 3, 5], &[2, 0, 4], 50 + k as u64);
    }
}

#[test]
fn f64_layers_use_the_reference_kernels() {
    for (k, sizes) in SPLITS.iter().enumerate() {
        let n: usize = sizes.iter().sum();
        let make = || {
            BatchNorm::<f64>::with_layout(
                Layout::from_axes(&[4], &[0, 2]).unwrap(),
                Config::preset(Preset::Pytorch),
            )
            .unwrap()
        };
        check_against_full::<f64>(&make, &[n, 4, 6], sizes, 60 + k as u64);
        let make = || {
            let config = Config::preset(Preset::Pytorch).activation(Activation::Relu);
            BatchNorm::<f64>::with_layout(Layout::from_axes(&[4], &[0, 2]).unwrap(), config).unwrap()
        };
        check_against_full::<f64>(&make, &[n, 4, 6], sizes, 70 + k as u64);
    }
}

#[test]
fn several_feature_axes() {
    // The seed's layout: (N, 5, 3) normalized over axis 0 with 5 x 3 features.
    let make = || BatchNorm::with_config([5, 3], [0], Config::preset(Preset::Pytorch)).unwrap();
    check_against_full::<f32>(&make, &[7, 5, 3], &[3, 4], 70);
}

#[test]
fn one_rank_matches_the_unsynchronized_layer() {
    let mut rng = Rng::new(80);
    let shape = [6, 4, 9];
    let x: Vec<f32> = rng.vec(6 * 4 * 9, -1.0, 3.0);
    let dy: Vec<f32> = rng.vec(x.len(), -1.0, 1.0);
    let mut a = BatchNorm::with_config(4, [0, 2], Config::preset(Preset::Pytorch)).unwrap();
    let mut b = a.clone();
    let (mut ya, mut yb, mut dxa, mut dxb) =
        (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
    a.forward_train(&x, &shape, &mut ya).unwrap();
    a.backward(&x, &dy, &shape, &mut dxa).unwrap();
    b.forward_train_sync(&x, &shape, &mut yb, &LocalGroup).unwrap();
    b.backward_sync(&x, &dy, &shape, &mut dxb, &LocalGroup).unwrap();
    assert_close("y", &yb, &ya, FWD);
    assert_close("dx", &dxb, &dxa, FWD);
    assert_close("running_var", b.running_var(), a.running_var(), FWD);
    assert_close("gamma_grad", b.gamma_grad(), a.gamma_grad(), FWD);
    assert_eq!(b.num_batches_tracked(), 1);
}

#[batch_norm(features = 6, axes = [0, 2, 3], preset = "pytorch")]
struct StemBn;

#[test]
fn macro_layers_synchronize_through_the_extension_trait() {
    let sizes = [2usize, 0, 3];
    let row = 6 * 2 * 2;
    let mut rng = Rng::new(90);
    let x: Vec<f32> = rng.vec(5 * row, -1.0, 4.0);
    let dy: Vec<f32> = rng.vec(5 * row, -1.0, 1.0);
    let mut full = StemBn::new();
    let (mut y_full, mut dx_full) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    full.forward_train(&x, &[5, 6, 2, 2], &mut y_full).unwrap();
    full.backward(&x, &dy, &[5, 6, 2, 2], &mut dx_full).unwrap();
    let results = on_ranks(3, |rank| {
        let r = rank.rank();
        let shape = [sizes[r], 6, 2, 2];
        let (x, dy) = (shard(&x, &sizes, r, row), shard(&dy, &sizes, r, row));
        let mut bn = StemBn::new();
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        SyncBatchNormExt::forward_train_sync(&mut bn, &x, &shape, &mut y, &rank).unwrap();
        bn.backward_sync(&x, &dy, &shape, &mut dx, &rank).unwrap();
        (y, dx, common::state(&bn))
    });
    for (r, (y, dx, state)) in results.iter().enumerate() {
        assert_eq!(state, &results[0].2, "rank {r}");
        assert_close("y", y, &shard(&y_full, &sizes, r, row), FWD);
        assert_close("dx", dx, &shard(&dx_full, &sizes, r, row), FWD);
    }
    let f32s = |bits: &[u64]| bits.iter().map(|&b| f64::from_bits(b) as f32).collect::<Vec<f32>>();
    assert_close("running_mean", &f32s(&results[0].2.running_mean), full.running_mean(), FWD);
    assert_close("running_var", &f32s(&results[0].2.running_var), full.running_var(), FWD);
    assert_close("gamma_grad", &f32s(&results[0].2.gamma_grad), full.gamma_grad(), FWD);
    assert_close("beta_grad", &f32s(&results[0].2.beta_grad), full.beta_grad(), FWD);
}

#[batch_norm(features = 3, axes = [0, 2, 3], spatial = [2, 5])]
struct SpatialBn;

/// A layer with `spatial` extents synchronizes with its compile-time shape: the synchronized
/// passes check those extents as its other passes do (on every rank, through the exchange),
/// and on one rank they give its unsynchronized results bit for bit.
#[test]
fn macro_layers_with_spatial_extents_check_them_when_synchronized() {
    let mut rng = Rng::new(91);
    let shape = [4, 3, 2, 5];
    let x: Vec<f32> = rng.vec(4 * 3 * 2 * 5, -2.0, 3.0);
    let dy: Vec<f32> = rng.vec(x.len(), -1.0, 1.0);
    let (mut a, mut b) = (SpatialBn::new(), SpatialBn::new());
    let (mut ya, mut yb, mut dxa, mut dxb) =
        (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
    a.forward_train(&x, &shape, &mut ya).unwrap();
    a.backward(&x, &dy, &shape, &mut dxa).unwrap();
    b.forward_train_sync(&x, &shape, &mut yb, &LocalGroup).unwrap();
    b.backward_sync(&x, &dy, &shape, &mut dxb, &LocalGroup).unwrap();
    assert_eq!(common::ebits(&yb), common::ebits(&ya), "y");
    assert_eq!(common::ebits(&dxb), common::ebits(&dxa), "dx");
    assert_eq!(common::state(&b), common::state(&a));

    let results = on_ranks(2, |rank| {
        // Rank 1's shard has the layer's feature extent but not its spatial extents.
        let shape = if rank.rank() == 0 { [2, 3, 2, 5] } else { [1, 3, 5, 2] };
        let x = vec![1.0f32; shape.iter().product()];
        let mut bn = SpatialBn::new();
        let before = common::state(&bn);
        let result = bn.forward_train_sync(&x, &shape, &mut vec![0.0; x.len()], &rank);
        (result, common::state(&bn) == before)
    });
    assert!(
        matches!(results[1].0, Err(BnError::SpatialMismatch { axis: 2, expected: 2, got: 5, .. })),
        "{:?}",
        results[1].0
    );
    assert!(matches!(results[0].0, Err(BnError::SyncMismatch { rank: 1, .. })), "{:?}", results[0].0);
    assert!(results.iter().all(|(_, unchanged)| *unchanged), "no rank changed");
}

/// Every rank's result of a forward where `layer(r)`, `shape(r)` and `x(r)` are rank `r`'s, with
/// each rank's state before and after.
fn forward_all(
    size: usize,
    layer: impl Fn(usize) -> BatchNorm + Sync,
    shape: impl Fn(usize) -> Vec<usize> + Sync,
    x: impl Fn(usize) -> Vec<f32> + Sync,
) -> Vec<(Result<(), BnError>, bool)> {
    on_ranks(size, |rank| {
        let r = rank.rank();
        let mut bn = layer(r);
        let before = full_state(&bn);
        let x = x(r);
        let mut y = vec![0.0; x.len()];
        let result = bn.forward_train_sync(&x, &shape(r), &mut y, &rank);
        (result, full_state(&bn) == before)
    })
}

#[test]
fn mismatched_feature_counts_are_an_error_on_every_rank() {
    let results = forward_all(
        3,
        |r| BatchNorm::new(if r == 1 { 4 } else { 3 }, [0]).unwrap(),
        |r| vec![2, if r == 1 { 4 } else { 3 }],
        |r| vec![1.0; if r == 1 { 8 } else { 6 }],
    );
    for (r, (result, unchanged)) in results.iter().enumerate() {
        match result {
            Err(BnError::SyncMismatch { rank: 1, message }) => {
                assert!(message.contains("4 features"), "{message}")
            }
            other => panic!("rank {r}: {other:?}"),
        }
        assert!(unchanged, "rank {r} changed");
    }
}

#[test]
fn shapes_that_differ_beyond_the_batch_axis_are_an_error_on_every_rank() {
    let results = forward_all(
        2,
        |_| BatchNorm::new(3, [0, 2]).unwrap(),
        |r| vec![2, 3, 4 + r],
        |r| vec![1.0; 2 * 3 * (4 + r)],
    );
    for (r, (result, unchanged)) in results.iter().enumerate() {
        let e = result.clone().unwrap_err();
        assert!(matches!(e, BnError::SyncMismatch { rank: 1, .. }), "rank {r}: {e}");
        assert!(e.to_string().contains("batch axis"), "{e}");
        assert!(unchanged);
    }
    // Another configuration is reported too.
    let results = forward_all(
        2,
        |r| BatchNorm::with_config(3, [0], Config::new().eps(if r == 0 { 1e-5 } else { 1e-3 })).unwrap(),
        |_| vec![2, 3],
        |_| vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    );
    for (result, unchanged) in &results {
        assert!(matches!(result, Err(BnError::SyncMismatch { rank: 1, .. })), "{result:?}");
        assert!(unchanged);
    }
}

#[test]
fn a_rank_that_fails_its_checks_fails_every_rank() {
    // Rank 2 passes a y of the wrong length: it gets its own error, the others name it.
    let results = on_ranks(3, |rank| {
        let r = rank.rank();
        let mut bn = BatchNorm::new(2, [0]).unwrap();
        let before = full_state(&bn);
        let x = vec![r as f32; 4];
        let mut y = vec![0.0; if r == 2 { 3 } else { 4 }];
        let result = bn.forward_train_sync(&x, &[2, 2], &mut y, &rank);
        (result, full_state(&bn) == before)
    });
    assert!(matches!(results[2].0, Err(BnError::BufferLength { buffer: "y", .. })), "{:?}", results[2].0);
    for (result, unchanged) in &results[..2] {
        let e = result.clone().unwrap_err();
        assert!(matches!(e, BnError::SyncMismatch { rank: 2, .. }), "{e}");
        assert!(e.to_string().contains("buffer length mismatch"), "{e}");
        assert!(unchanged);
    }
    // backward_sync without a forward on one rank.
    let results = on_ranks(2, |rank| {
        let r = rank.rank();
        let mut bn = BatchNorm::new(1, [0]).unwrap();
        let x = [1.0f32, 2.0];
        let mut y = [0.0; 2];
        if r == 0 {
            bn.forward_train(&x, &[2, 1], &mut y).unwrap();
        }
        let mut dx = [0.0; 2];
        bn.backward_sync(&x, &[1.0, 1.0], &[2, 1], &mut dx, &rank)
    });
    assert!(matches!(results[0], Err(BnError::SyncMismatch { rank: 1, .. })), "{:?}", results[0]);
    assert_eq!(results[1], Err(BnError::NoForward));
}

#[test]
fn the_global_batch_needs_two_values_per_feature() {
    // One value on rank 0, none on rank 1: too few globally, on every rank.
    let results =
        forward_all(2, |_| BatchNorm::new(2, [0]).unwrap(), |r| vec![1 - r, 2], |r| vec![1.0; 2 * (1 - r)]);
    for (result, unchanged) in &results {
        assert_eq!(result, &Err(BnError::TooFewValues { shape: vec![1, 2] }));
        assert!(unchanged);
    }
    // No values anywhere.
    let results = forward_all(2, |_| BatchNorm::new(2, [0]).unwrap(), |_| vec![0, 2], |_| Vec::new());
    for (result, _) in &results {
        assert_eq!(result, &Err(BnError::EmptyBatch { shape: vec![0, 2] }));
    }
    // One value on each of two ranks is enough.
    let results = forward_all(2, |_| BatchNorm::new(2, [0]).unwrap(), |_| vec![1, 2], |r| vec![r as f32; 2]);
    for (result, unchanged) in &results {
        assert_eq!(result, &Ok(()));
        assert!(!unchanged);
    }
}

#[test]
fn non_finite_global_statistics_are_an_error_on_every_rank() {
    let results = forward_all(
        3,
        |_| BatchNorm::new(2, [0]).unwrap(),
        |_| vec![2, 2],
        |r| if r == 1 { vec![1.0, f32::NAN, 2.0, 3.0] } else { vec![1.0, 2.0, 3.0, 4.0] },
    );
    for (result, unchanged) in &results {
        assert!(matches!(result, Err(BnError::NonFinite { index: 1, .. })), "{result:?}");
        assert!(unchanged);
    }
}

#[test]
fn a_rank_that_leaves_does_not_hang_the_others() {
    let mut ranks = ThreadGroup::new(2);
    let rank0 = ranks.remove(0);
    drop(ranks); // rank 1 leaves
    let mut bn = BatchNorm::new(1, [0]).unwrap();
    let mut y = [0.0; 2];
    let result = bn.forward_train_sync(&[1.0, 2.0], &[2, 1], &mut y, &rank0);
    assert!(matches!(result, Err(BnError::SyncGroup(_))), "{result:?}");
    assert_eq!(bn.num_batches_tracked(), 0);
    // A rank that leaves while another waits releases it.
    let results = on_ranks(2, |rank| {
        if rank.rank() == 1 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(rank);
            return Ok(Vec::new());
        }
        rank.all_gather(&[1.0])
    });
    assert!(matches!(results[0], Err(BnError::SyncGroup(_))), "{:?}", results[0]);
}

#[test]
fn backward_sync_must_follow_a_synchronized_forward() {
    // Unsynchronized forwards saved statistics of 2 values per feature; the group's batch has 4.
    let results = on_ranks(2, |rank| {
        let mut bn = BatchNorm::new(1, [0]).unwrap();
        let x = [1.0f32, 2.0 + rank.rank() as f32];
        let mut y = [0.0; 2];
        bn.forward_train(&x, &[2, 1], &mut y).unwrap();
        let mut dx = [0.0; 2];
        (bn.backward_sync(&x, &[1.0, -1.0], &[2, 1], &mut dx, &rank), bn.gamma_grad() == [0.0])
    });
    for (result, unchanged) in &results {
        let e = result.clone().unwrap_err();
        assert!(e.to_string().contains("must follow forward_train_sync"), "{e}");
        assert!(unchanged);
    }
}

// ------------------------------------------------------------------------------------------------
// Messages from other processes are validated before anything is merged
// ------------------------------------------------------------------------------------------------

/// A group whose transport is `gather`: it receives this rank's message and returns what the
/// "ranks" sent, so a test can deliver recorded, forged or mutated messages.
struct Forged<F: Fn(&[f64]) -> Vec<Vec<f64>>> {
    size: usize,
    gather: F,
}

impl<F: Fn(&[f64]) -> Vec<Vec<f64>>> StatsGroup for Forged<F> {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &[f64]) -> Result<Vec<Vec<f64>>, BnError> {
        Ok((self.gather)(local))
    }
}

/// The message `layer` sends in a synchronized forward of `x` (of `shape`), recorded through a
/// group of one.
fn recorded_forward(mut layer: BatchNorm, x: &[f32], shape: &[usize]) -> Vec<f64> {
    let seen = std::cell::RefCell::new(Vec::new());
    let group = Forged {
        size: 1,
        gather: |m: &[f64]| {
            *seen.borrow_mut() = m.to_vec();
            vec![m.to_vec()]
        },
    };
    let mut y = vec![0.0; x.len()];
    // An empty shard alone is an empty batch; its message is recorded all the same.
    let _ = layer.forward_train_sync(x, shape, &mut y, &group);
    seen.into_inner()
}

/// Index of the `count` field of a message, and of its payload for a shape of rank `r`.
const COUNT_AT: usize = 4;
fn payload_at(rank: usize) -> usize {
    15 + rank
}

/// A forward of a 4-feature layer through `group`; returns the result and whether the layer
/// (and its backward state) is unchanged.
fn forward_through(group: &impl StatsGroup, shape: &[usize]) -> (Result<(), BnError>, bool) {
    let mut bn = BatchNorm::new(shape[1], [0]).unwrap();
    let x: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| (i % 5) as f32).collect();
    let mut y = vec![0.0; x.len()];
    let before = full_state(&bn);
    let result = bn.forward_train_sync(&x, shape, &mut y, group);
    let mut dx = vec![0.0; x.len()];
    let no_forward = matches!(bn.backward(&x, &x, shape, &mut dx), Err(BnError::NoForward));
    (result, full_state(&bn) == before && no_forward)
}

#[test]
fn a_message_of_a_layer_with_fewer_features_is_an_error() {
    // A well-formed message of a 1-feature layer, delivered to a 4-feature layer's forward.
    let one = recorded_forward(BatchNorm::new(1, [0]).unwrap(), &[1.0, 2.0], &[2, 1]);
    let group = Forged { size: 1, gather: |_: &[f64]| vec![one.clone()] };
    let (result, unchanged) = forward_through(&group, &[2, 4]);
    match result {
        Err(BnError::SyncGroup(message)) => assert!(message.contains("do not match"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);
    // The same message as rank 1's of two: rank 1 disagrees with rank 0 (this rank).
    let group = Forged { size: 2, gather: |m: &[f64]| vec![m.to_vec(), one.clone()] };
    let (result, unchanged) = forward_through(&group, &[2, 4]);
    assert!(matches!(result, Err(BnError::SyncMismatch { rank: 1, .. })), "{result:?}");
    assert!(unchanged);
}

#[test]
fn ranks_of_another_element_type_are_an_error_on_every_rank() {
    let results = on_ranks(2, |rank| {
        let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let shape = [4, 2];
        if rank.rank() == 1 {
            let layout = Layout::from_axes(&[2], &[0]).unwrap();
            let mut bn = BatchNorm::<f64>::with_layout(layout, Config::new()).unwrap();
            let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut y = vec![0.0; 8];
            let before = full_state(&bn);
            (bn.forward_train_sync(&x, &shape, &mut y, &rank), full_state(&bn) == before)
        } else {
            let mut bn = BatchNorm::new(2, [0]).unwrap();
            let mut y = vec![0.0; 8];
            let before = full_state(&bn);
            (bn.forward_train_sync(&x, &shape, &mut y, &rank), full_state(&bn) == before)
        }
    });
    for (r, (result, unchanged)) in results.iter().enumerate() {
        match result {
            Err(BnError::SyncMismatch { rank: 1, message }) => {
                assert!(message.contains("f64") && message.contains("f32"), "{message}")
            }
            other => panic!("rank {r}: {other:?}"),
        }
        assert!(unchanged, "rank {r} changed");
    }
}

#[test]
fn forged_counts_are_an_error_and_change_nothing() {
    for count in [-1.0, 0.5, 1e300, 3.0, 5.0, f64::NAN, f64::INFINITY] {
        // As this rank's own message and as a second rank's.
        for size in [1, 2] {
            let group = Forged {
                size,
                gather: |m: &[f64]| {
                    let mut forged = m.to_vec();
                    forged[COUNT_AT] = count;
                    if size == 1 {
                        vec![forged]
                    } else {
                        vec![m.to_vec(), forged]
                    }
                },
            };
            let (result, unchanged) = forward_through(&group, &[4, 2]);
            match &result {
                Err(BnError::SyncMismatch { rank, message }) => {
                    assert_eq!(*rank, size - 1, "count {count}");
                    assert!(message.contains("values per feature"), "{message}");
                }
                other => panic!("count {count}, size {size}: {other:?}"),
            }
            assert!(unchanged, "count {count}, size {size}");
        }
    }
}

#[test]
fn forged_moments_are_an_error_and_change_nothing() {
    // A negative sum of squared deviations (feature 1), and moments for an empty shard.
    let negative = |m: &[f64]| {
        let mut forged = m.to_vec();
        forged[payload_at(2) + 2 + 1] = -1e6;
        vec![m.to_vec(), forged]
    };
    let (result, unchanged) = forward_through(&Forged { size: 2, gather: negative }, &[4, 2]);
    match &result {
        Err(BnError::SyncMismatch { rank: 1, message }) => assert!(message.contains("negative"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(unchanged);

    let empty = recorded_forward(BatchNorm::new(2, [0]).unwrap(), &[], &[0, 2]);
    let forged_empty = |m: &[f64]| {
        let mut forged = empty.clone();
        forged[payload_at(2)] = 1e30;
        vec![m.to_vec(), forged]
    };
    let (result, unchanged) = forward_through(&Forged { size: 2, gather: forged_empty }, &[4, 2]);
    assert!(matches!(result, Err(BnError::SyncMismatch { rank: 1, .. })), "{result:?}");
    assert!(unchanged);

    // Non-finite moments are the statistics of non-finite data: NonFinite, as unsynchronized.
    let infinite = |m: &[f64]| {
        let mut forged = m.to_vec();
        forged[payload_at(2)] = f64::INFINITY;
        vec![m.to_vec(), forged]
    };
    let (result, unchanged) = forward_through(&Forged { size: 2, gather: infinite }, &[4, 2]);
    assert!(matches!(result, Err(BnError::NonFinite { index: 0, .. })), "{result:?}");
    assert!(unchanged);
}

#[test]
fn truncated_and_mutated_messages_never_panic() {
    // Every prefix of a real message, and every field replaced by values a hostile or buggy
    // peer might send, as rank 1's message: an error or (for harmless values) Ok; never a
    // panic, and after an error the layer is unchanged.
    let x: Vec<f32> = (0..12).map(|i| (i % 5) as f32).collect();
    let real = recorded_forward(BatchNorm::new(3, [0]).unwrap(), &x, &[4, 3]);
    let mut variants: Vec<Vec<f64>> = (0..real.len()).map(|n| real[..n].to_vec()).collect();
    for i in 0..real.len() {
        for v in [-1.0, 0.0, 0.5, 2.0, 1e300, -1e300, f64::NAN, f64::INFINITY, 2f64.powi(60)] {
            let mut m = real.clone();
            m[i] = v;
            variants.push(m);
        }
    }
    variants.push([real.clone(), vec![0.0; 4]].concat());
    for m in &variants {
        let group = Forged { size: 2, gather: |mine: &[f64]| vec![mine.to_vec(), m.clone()] };
        let (result, unchanged) = forward_through(&group, &[4, 3]);
        if result.is_err() {
            assert!(unchanged, "{m:?}: {result:?}");
        }
    }
}

#[test]
fn forged_backward_counts_are_an_error_and_change_nothing() {
    let mut bn = BatchNorm::new(2, [0]).unwrap();
    let x: Vec<f32> = (0..8).map(|i| (i % 3) as f32).collect();
    let mut y = vec![0.0; 8];
    bn.forward_train_sync(&x, &[4, 2], &mut y, &LocalGroup).unwrap();
    for count in [-1.0, 0.5, 3.0, 1e300] {
        let group = Forged {
            size: 1,
            gather: |m: &[f64]| {
                let mut forged = m.to_vec();
                forged[COUNT_AT] = count;
                vec![forged]
            },
        };
        let before = full_state(&bn);
        let mut dx = vec![0.0; 8];
        let result = bn.backward_sync(&x, &[1.0; 8], &[4, 2], &mut dx, &group);
        assert!(matches!(result, Err(BnError::SyncMismatch { rank: 0, .. })), "{count}: {result:?}");
        assert!(full_state(&bn) == before, "count {count}");
    }
}
