//! Extreme shapes: extents of 1 everywhere, one huge axis, C = 1, C = 65536, rank 8 (and more),
//! element counts at the edge of `usize` (checked arithmetic, exercised through
//! `Layout::canonical` and the layer's errors without allocating the tensor), feature counts at
//! and over `MAX_FEATURES`, and layers whose state cannot be allocated (in a child process under
//! a limited address space). The shapes that
//! are run are run on every backend this machine has, against an `f64` reference.

use crate::common;

use batchnorm::{batch_norm, Backend, BatchNorm, BnError, Canonical, Config, Family, Layout, MAX_FEATURES};
use common::{full_state, Rng};

/// The reference: per-channel biased statistics and the normalized output (gamma 1, beta 0).
fn reference(x: &[f32], dims: Canonical, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (c, inner) = (dims.channels, dims.inner);
    let ch = |i: usize| (i / inner) % c;
    let n = dims.per_channel() as f64;
    let mut mean = vec![0.0; c];
    x.iter().enumerate().for_each(|(i, &v)| mean[ch(i)] += v as f64);
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; c];
    x.iter().enumerate().for_each(|(i, &v)| var[ch(i)] += (v as f64 - mean[ch(i)]).powi(2));
    var.iter_mut().for_each(|v| *v /= n);
    let y =
        x.iter().enumerate().map(|(i, &v)| (v as f64 - mean[ch(i)]) / (var[ch(i)] + eps).sqrt()).collect();
    (mean, var, y)
}

/// Trains, infers and differentiates on every backend and checks against the reference.
fn check_runs(name: &str, features: &[usize], axes: &[usize], shape: &[usize], seed: u64) {
    let layout = Layout::from_axes(features, axes).unwrap();
    let dims = layout.canonical(shape).unwrap();
    let n = dims.len();
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = rng.vec(n, -2.0, 3.0);
    let dy: Vec<f32> = rng.vec(n, -1.0, 1.0);
    let eps = 1e-5;
    let (mean, var, want) = reference(&x, dims, eps);
    for b in Backend::available() {
        let what = format!("{name} {shape:?} ({dims:?}) on {b}");
        let mut l = BatchNorm::with_config(features, axes, Config::new().momentum(0.0)).unwrap();
        l.set_backend(Some(b)).unwrap();
        let mut y = vec![f32::NAN; n];
        l.forward_train(&x, shape, &mut y).unwrap_or_else(|e| panic!("{what}: {e}"));
        let worst = y.iter().zip(&want).map(|(&a, &w)| (a as f64 - w).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{what}: forward_train off by {worst:e}");
        for c in 0..dims.channels {
            let dm = (l.running_mean()[c] as f64 - mean[c]).abs();
            let dv = (l.running_var()[c] as f64 - var[c]).abs();
            assert!(dm <= 1e-5 && dv <= 1e-4 * var[c] + 1e-7, "{what}: statistics of channel {c}");
        }
        let mut ye = vec![f32::NAN; n];
        l.forward_eval(&x, shape, &mut ye).unwrap();
        let worst = ye.iter().zip(&want).map(|(&a, &w)| (a as f64 - w).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{what}: forward_eval off by {worst:e}");
        let mut dx = vec![f32::NAN; n];
        l.backward(&x, &dy, shape, &mut dx).unwrap();
        assert!(dx.iter().all(|v| v.is_finite()), "{what}: backward");
        // dx against the reference, relative to the channel's gamma * inv_std * max |dy|.
        let ch = |i: usize| (i / dims.inner) % dims.channels;
        let pc = dims.per_channel() as f64;
        let (mut sdy, mut sdyx) = (vec![0.0; dims.channels], vec![0.0; dims.channels]);
        for i in 0..n {
            sdy[ch(i)] += dy[i] as f64;
            sdyx[ch(i)] += dy[i] as f64 * want[i];
        }
        for i in 0..n {
            let inv_std = 1.0 / (var[ch(i)] + eps).sqrt();
            let w = inv_std * (dy[i] as f64 - sdy[ch(i)] / pc - want[i] * sdyx[ch(i)] / pc);
            let err = (dx[i] as f64 - w).abs();
            assert!(err <= 1e-4 * inv_std, "{what}: dx[{i}] = {:e}, want {w:e}", dx[i]);
        }
        l.backward_eval(&x, &dy, shape, &mut dx).unwrap();
        assert!(dx.iter().all(|v| v.is_finite()), "{what}: backward_eval");
    }
}

#[test]
fn extents_of_one_everywhere() {
    // (Under Miri, which is slow, ranks 2 to 4 and only the ends and the middle.)
    let ranks = if cfg!(miri) { 2..=4 } else { 2..=8 };
    for rank in ranks {
        for first in 0..rank {
            if cfg!(miri) && first != 0 && first != rank / 2 && first != rank - 1 {
                continue;
            }
            let axes: Vec<usize> = (0..rank).filter(|&a| a != first).collect();
            let shape = vec![1usize; rank];
            let what = format!("rank {rank}, feature axis {first}");
            for b in Backend::available() {
                let mut l = BatchNorm::new(1, &axes).unwrap();
                l.set_backend(Some(b)).unwrap();
                let before = full_state(&l);
                let mut y = [f32::NAN];
                // One value per feature: training (and batch statistics) need two.
                let err = l.forward_train(&[3.0], &shape, &mut y).unwrap_err();
                assert!(matches!(err, BnError::TooFewValues { .. }), "{what} {b}: {err:?}");
                assert_eq!(full_state(&l), before);
                assert!(matches!(l.backward(&[3.0], &[1.0], &shape, &mut y), Err(BnError::NoForward)));
                // Inference works: y = x / sqrt(1 + eps).
                l.forward_eval(&[3.0], &shape, &mut y).unwrap();
                assert!((y[0] - 3.0 / (1.0f32 + 1e-5).sqrt()).abs() <= 1e-6, "{what} {b}: {}", y[0]);
                let mut xy = [3.0f32];
                l.forward_eval_inplace(&mut xy, &shape).unwrap();
                assert_eq!(xy[0].to_bits(), y[0].to_bits());
                l.backward_eval(&[3.0], &[2.0], &shape, &mut y).unwrap();
                assert_eq!(l.beta_grad(), &[2.0]);
                // Two values: a reduced extent of 2 anywhere.
                let reduced = axes[rank / 2 % axes.len()];
                let mut shape2 = shape.clone();
                shape2[reduced] = 2;
                let mut y2 = [0.0f32; 2];
                l.forward_train(&[1.0, 4.0], &shape2, &mut y2).unwrap();
                assert!((y2[0] + 1.0).abs() < 1e-5 && (y2[1] - 1.0).abs() < 1e-5, "{what} {b}: {y2:?}");
            }
        }
    }
}

#[test]
fn one_huge_axis() {
    if cfg!(miri) {
        return;
    }
    // 2 MiB tensors: far above every block, chunk and parallel threshold of the kernels.
    let long = 1 << 19;
    check_runs("planes, C = 1, one run", &[1], &[0, 2], &[1, 1, long], 1);
    check_runs("rows, C = 1, one column", &[1], &[0], &[long, 1], 2);
    check_runs("planes, two long runs", &[2], &[0, 2], &[1, 2, long / 2], 3);
    check_runs("rows, C = 3", &[3], &[0], &[long / 4, 3], 4);
}

#[test]
fn one_feature() {
    check_runs("NC, C = 1", &[1], &[0], &[37, 1], 10);
    check_runs("NCHW, C = 1", &[1], &[0, 2, 3], &[2, 1, 3, 5], 11);
    check_runs("NHWC, C = 1", &[1], &[0, 1, 2], &[2, 3, 5, 1], 12);
    check_runs("NCL, N = 1", &[1], &[0, 2], &[1, 1, 2], 13);
}

#[test]
fn c_65536() {
    if cfg!(miri) {
        return;
    }
    check_runs("NC, C = 65536", &[65536], &[0], &[2, 65536], 20);
    check_runs("NCL, C = 65536, inner 2", &[65536], &[0, 2], &[2, 65536, 2], 21);
    check_runs("features [256, 256]", &[256, 256], &[0], &[3, 256, 256], 22);
}

#[test]
fn rank_8_and_beyond() {
    let shape = [2usize, 1, 3, 2, 1, 3, 2, 2];
    for first in 0..8 {
        for nf in 1..=3 {
            if first + nf > 8 || (cfg!(miri) && (nf > 1 || first % 3 != 0)) {
                continue;
            }
            let features: Vec<usize> = shape[first..first + nf].to_vec();
            let axes: Vec<usize> = (0..8).filter(|a| !(first..first + nf).contains(a)).collect();
            let dims = Layout::from_axes(&features, &axes).unwrap().canonical(&shape).unwrap();
            if dims.per_channel() < 2 {
                continue;
            }
            check_runs(
                &format!("rank 8, features {features:?} at {first}"),
                &features,
                &axes,
                &shape,
                first as u64,
            );
        }
    }
    // Rank 24: many extent-1 axes around a small real tensor.
    let mut shape = vec![1usize; 24];
    shape[3] = 5;
    shape[10] = 4;
    shape[20] = 3;
    let axes: Vec<usize> = (0..24).filter(|&a| a != 10).collect();
    check_runs("rank 24", &[4], &axes, &shape, 30);
}

/// Shapes whose element count is at or past `usize::MAX`: `canonical` uses checked arithmetic,
/// and the layer rejects them (or the buffers that cannot match them) without allocating.
#[test]
fn element_counts_at_the_overflow_limit() {
    let max = usize::MAX;
    let nc3 = Layout::from_axes(&[3], &[0, 2]).unwrap();
    let ok = nc3.canonical(&[max / 3, 3, 1]).unwrap();
    assert_eq!((ok.outer, ok.channels, ok.inner, ok.len()), (max / 3, 3, 1, max / 3 * 3));
    assert_eq!(ok.family(), Family::Rows);
    let ok = nc3.canonical(&[2, 3, max / 6]).unwrap();
    assert_eq!(ok.per_channel(), max / 6 * 2);
    assert_eq!(ok.family(), Family::Planes);
    for bad in
        [[max / 3 + 1, 3, 1], [2, 3, max / 6 + 1], [max, 3, max], [max, 3, 2], [0, 3, max], [max, 3, 0]]
    {
        assert!(
            matches!(nc3.canonical(&bad), Err(BnError::ShapeOverflow { ref shape }) if shape == &bad),
            "{bad:?}"
        );
    }
    // An empty shape whose other extents fit is a valid empty tensor.
    let empty = nc3.canonical(&[0, 3, max / 3]).unwrap();
    assert!(empty.is_empty());

    // Rank 8: 256^8 = 2^64 overflows, 256^7 * 255 does not.
    let r8 = Layout::from_axes(&[256], &[1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert!(matches!(r8.canonical(&[256; 8]), Err(BnError::ShapeOverflow { .. })));
    let mut s = [256usize; 8];
    s[7] = 255;
    assert_eq!(r8.canonical(&s).unwrap().len(), (1usize << 56) * 255);

    // Feature extents whose product overflows are a layout error, not a panic.
    for features in [vec![max, 2], vec![1 << 32, 1 << 32], vec![1 << 22, 1 << 22, 1 << 22]] {
        let rank = features.len() + 1;
        assert!(
            matches!(Layout::new(rank, 1, &features), Err(BnError::ShapeOverflow { .. })),
            "{features:?}"
        );
    }

    // The layer: every entry point reports the mismatch (or the overflow) before it touches
    // anything; the data slices are empty, so nothing the size of the shape exists.
    for b in Backend::available() {
        let mut l = BatchNorm::new(3, [0, 2]).unwrap();
        l.set_backend(Some(b)).unwrap();
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut y = vec![0.0; 12];
        l.forward_train(&x, &[2, 3, 2], &mut y).unwrap();
        let before = full_state(&l);
        let huge = [max / 3, 3, 1];
        let mut none: [f32; 0] = [];
        let buffer_len = |r: Result<(), BnError>| matches!(r, Err(BnError::BufferLength { expected, got: 0, .. }) if expected == max / 3 * 3);
        assert!(buffer_len(l.forward_train(&[], &huge, &mut none)));
        assert!(buffer_len(l.forward_eval(&[], &huge, &mut none)));
        assert!(buffer_len(l.forward_eval_inplace(&mut none, &huge)));
        assert!(buffer_len(l.backward(&[], &[], &huge, &mut none)));
        assert!(buffer_len(l.backward_eval(&[], &[], &huge, &mut none)));
        let over = [max, 3, 2];
        let overflow = |r: Result<(), BnError>| matches!(r, Err(BnError::ShapeOverflow { .. }));
        assert!(overflow(l.forward_train(&[], &over, &mut none)));
        assert!(overflow(l.forward_eval(&[], &over, &mut none)));
        assert!(overflow(l.forward_eval_inplace(&mut none, &over)));
        assert!(overflow(l.backward(&[], &[], &over, &mut none)));
        assert!(overflow(l.backward_eval(&[], &[], &over, &mut none)));
        assert_eq!(full_state(&l), before, "{b}: errors changed the layer");
        // The valid empty tensor of a huge shape: inference is a no-op, training an error.
        let zero = [0, 3, max / 3];
        l.forward_eval(&[], &zero, &mut none).unwrap();
        l.forward_eval_inplace(&mut none, &zero).unwrap();
        assert!(matches!(l.forward_train(&[], &zero, &mut none), Err(BnError::EmptyBatch { .. })));
        assert!(matches!(l.backward(&[], &[], &zero, &mut none), Err(BnError::BackwardShape { .. })));
        assert_eq!(full_state(&l), before, "{b}: errors changed the layer");
        l.backward_eval(&[], &[], &zero, &mut none).unwrap();
        assert_eq!(l.gamma_grad(), &[0.0; 3]);
        assert_eq!(l.beta_grad(), &[0.0; 3]);
    }

    // A wide layer: C = 65536 (4096 under Miri), a batch count that overflows only with C.
    let c = if cfg!(miri) { 4096 } else { 65536 };
    let mut wide = BatchNorm::new(c, [0]).unwrap();
    let before = full_state(&wide);
    let mut none: [f32; 0] = [];
    let r = wide.forward_train(&[], &[max / c + 1, c], &mut none);
    assert!(matches!(r, Err(BnError::ShapeOverflow { .. })), "{r:?}");
    let r = wide.forward_train(&[], &[max / c, c], &mut none);
    assert!(matches!(r, Err(BnError::BufferLength { .. })), "{r:?}");
    assert_eq!(full_state(&wide), before);
}

/// Ranks and feature extents that do not match the layer: errors, never a panic or an
/// out-of-bounds read of `shape`.
#[test]
fn mismatched_ranks_and_extents() {
    let l = BatchNorm::new([2, 3], [0, 3]).unwrap();
    assert_eq!(l.rank(), 4);
    let mut none: [f32; 0] = [];
    for shape in [&[][..], &[2], &[1, 2, 3], &[1, 2, 3, 4, 5], &[1; 64]] {
        assert!(
            matches!(l.forward_eval(&[], shape, &mut none), Err(BnError::RankMismatch { .. })),
            "{shape:?}"
        );
    }
    for shape in [[1, 3, 2, 1], [1, 2, 2, 1], [1, 0, 3, 1], [1, 6, 1, 1], [1, usize::MAX, 3, 1]] {
        assert!(
            matches!(l.forward_eval(&[], &shape, &mut none), Err(BnError::FeatureMismatch { .. })),
            "{shape:?}"
        );
    }
}

/// `MAX_FEATURES` (2^31) is enforced by every constructor before anything is allocated: one
/// feature more is `InvalidLayout`, and the message states the limit.
#[test]
fn more_than_max_features_is_an_error() {
    assert_eq!(MAX_FEATURES, 1 << 31);
    // At the limit the layout exists (the layer's state, 176 GiB, is not built here).
    assert_eq!(Layout::from_axes(&[MAX_FEATURES], &[0]).unwrap().channels(), MAX_FEATURES);
    assert_eq!(Layout::new(3, 1, &[65536, 32768]).unwrap().channels(), MAX_FEATURES);
    let over: [&[usize]; 5] =
        [&[MAX_FEATURES + 1], &[65536, 32769], &[1 << 40], &[2, 1 << 30, 2], &[3, MAX_FEATURES]];
    for features in over {
        let limit = |r: Result<(), BnError>| match r {
            Err(BnError::InvalidLayout(message)) => {
                message.contains("2147483648") && message.contains("MAX_FEATURES")
            }
            _ => false,
        };
        let axes: Vec<usize> = (features.len()..features.len() + 2).collect();
        assert!(limit(Layout::from_axes(features, &axes).map(drop)), "{features:?}: Layout::from_axes");
        assert!(limit(Layout::new(features.len() + 1, 0, features).map(drop)), "{features:?}: Layout::new");
        assert!(limit(BatchNorm::new(features, [0]).map(drop)), "{features:?}: BatchNorm::new");
        assert!(
            limit(BatchNorm::with_config(features, &axes, Config::new()).map(drop)),
            "{features:?}: BatchNorm::with_config"
        );
    }
}

/// A generated layer whose state (2^30 features: 88 GiB) a 4 GB address space cannot hold.
#[batch_norm(features = 1073741824, axes = [0])]
struct WideBn;

/// What the child process of [`state_that_cannot_be_allocated_is_an_error`] does: its role.
const CHILD: &str = "BN_EXTREME_SHAPES_CHILD";

/// Runs this test binary's test `name` in a child process whose address space is limited to
/// 4 GB (`ulimit -v 4000000`), with [`CHILD`] set to `role`.
#[cfg(unix)]
fn run_limited(name: &str, role: &str) -> std::process::Output {
    let exe = std::env::current_exe().expect("the path of the test binary");
    // The test's full name: this module's path within the test crate, then `name`.
    let name = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::{name}"),
        None => name.to_string(),
    };
    std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 4000000 && exec "$0" "$@""#)
        .arg(exe)
        .args([&name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, role)
        .output()
        .expect("sh runs the test binary")
}

/// A layer whose state cannot be allocated is `BnError::Allocation` from every fallible
/// constructor (runtime layers of both parameter types, a generated layer's `try_new`), and the
/// process goes on; a generated layer's `new()` aborts as `Vec` does. Run in child processes
/// under a 4 GB address space, where the state of 2^28 `f32` features (22 GiB, 1 GiB per
/// parameter buffer) fails part way through its buffers, and larger ones at the first buffer
/// (each GiB written takes seconds in a debug build, so only the first case fills that much).
#[test]
fn state_that_cannot_be_allocated_is_an_error() {
    const NAME: &str = "state_that_cannot_be_allocated_is_an_error";
    let allocation = |r: Result<(), BnError>| matches!(r, Err(BnError::Allocation { .. }));
    match std::env::var(CHILD).as_deref() {
        Ok("try") => {
            let wide = 1usize << 28;
            assert!(allocation(BatchNorm::new(wide, [0]).map(drop)), "BatchNorm::new");
            assert!(allocation(BatchNorm::new([1 << 15, 1 << 15], [0, 3]).map(drop)), "two extents");
            let layout = Layout::from_axes(&[wide << 1], &[0]).unwrap();
            assert!(allocation(BatchNorm::<f64>::with_layout(layout, Config::new()).map(drop)), "f64");
            let err = WideBn::try_new().map(drop).unwrap_err();
            assert!(allocation(Err(err.clone())), "WideBn::try_new: {err:?}");
            assert!(err.to_string().starts_with("cannot allocate the layer's "), "{err}");
            // The buffers of the failed attempts were freed: an ordinary layer is built.
            let mut small = BatchNorm::new(1 << 20, [0]).unwrap();
            let mut y = vec![0.0; 2 << 20];
            small.forward_train(&vec![1.0; 2 << 20], &[2, 1 << 20], &mut y).unwrap();
            println!("child: every constructor returned BnError::Allocation");
            return;
        }
        Ok("abort") => {
            let _ = WideBn::new();
            println!("child: WideBn::new() returned");
            return;
        }
        _ => {}
    }
    if cfg!(miri) || !cfg!(unix) {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        let out = run_limited(NAME, "try");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success() && stdout.contains("child: every constructor returned BnError::Allocation"),
            "the child failed ({:?}):\n{stdout}\n{stderr}",
            out.status
        );
        let out = run_limited(NAME, "abort");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.signal(), Some(6), "new() aborts (SIGABRT):\n{stdout}\n{stderr}");
        assert!(stderr.contains("memory allocation of"), "{stderr}");
    }
}
