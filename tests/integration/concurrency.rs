//! Concurrency: the layers and their companion types are `Send + Sync`; `forward_eval` on one
//! shared layer from many threads at once gives the serial bits on every backend; the layer
//! nests inside a user's own Rayon pools (an `install` inside another pool's `install`, and calls
//! from inside `par_iter`) without deadlock, and runs on the caller's pool rather than starting
//! Rayon's global one (no oversubscription).

use crate::common;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use batchnorm::checkpoint::{Naming, StateDict};
use batchnorm::{
    batch_norm, Backend, BatchNorm, BatchNormLayer, BnError, Canonical, Config, Features, Layout, Preset,
};
use common::{assert_bits_eq, Rng};
use rayon::prelude::*;

#[batch_norm(features = 16, axes = [0, 2, 3], preset = "pytorch")]
struct MacroBn;

#[test]
fn layers_and_companion_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send_sync_static<T: Send + Sync + 'static>() {}
    send_sync::<BatchNorm>();
    send_sync::<BatchNorm<f64>>();
    send_sync::<MacroBn>();
    send_sync::<Box<dyn BatchNormLayer<Elem = f32, Param = f32> + Send + Sync>>();
    send_sync::<Layout>();
    send_sync::<Canonical>();
    send_sync::<Config>();
    send_sync::<Backend>();
    send_sync::<Features>();
    send_sync::<StateDict>();
    send_sync::<Naming<'static>>();
    send_sync_static::<BnError>();
    send_sync::<Arc<BatchNorm>>();
}

/// Runs `f` on another thread and fails if it has not finished within `secs` (a deadlock).
fn watchdog<R: Send + 'static>(name: &str, secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: not finished after {secs} s (deadlock?)"),
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool")
}

/// Shapes large enough that every kernel splits its work into several Rayon tasks.
fn cases() -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    if cfg!(miri) {
        return vec![(vec![2, 3, 4, 5], vec![0, 2, 3], vec![3])];
    }
    vec![
        (vec![4, 16, 32, 64], vec![0, 2, 3], vec![16]), // planes, 512 KiB
        (vec![8192, 16], vec![0], vec![16]),            // rows
    ]
}

/// A trained layer on `backend` and inputs for it.
fn setup(
    shape: &[usize],
    axes: &[usize],
    features: &[usize],
    backend: Backend,
) -> (BatchNorm, Vec<Vec<f32>>) {
    let n: usize = shape.iter().product();
    let c: usize = features.iter().product();
    let mut rng = Rng::new(n as u64);
    let mut l = BatchNorm::with_config(features, axes, Config::preset(Preset::Keras)).unwrap();
    l.set_backend(Some(backend)).unwrap();
    l.update_params(&rng.vec(c, 0.5, 1.5), &rng.vec(c, -0.5, 0.5)).unwrap();
    l.set_running_stats(&rng.vec(c, -0.5, 0.5), &rng.vec(c, 0.5, 2.0)).unwrap();
    let inputs = (0..4).map(|_| rng.vec(n, -3.0, 3.0)).collect();
    (l, inputs)
}

fn eval(l: &BatchNorm, x: &[f32], shape: &[usize]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    l.forward_eval(x, shape, &mut y).unwrap();
    y
}

/// Many OS threads call `forward_eval` (and the in-place form) on one shared layer at once,
/// each also running the kernels' own parallelism on the global pool: every result is the
/// serial one, bit for bit, on every backend.
#[test]
fn forward_eval_from_many_threads_at_once_is_identical() {
    let threads = if cfg!(miri) { 2 } else { 8 };
    let rounds = if cfg!(miri) { 1 } else { 3 };
    for (shape, axes, features) in cases() {
        for b in Backend::available() {
            let (layer, inputs) = setup(&shape, &axes, &features, b);
            let serial: Vec<Vec<f32>> =
                pool(1).install(|| inputs.iter().map(|x| eval(&layer, x, &shape)).collect());
            let name = format!("{b} {shape:?}");
            let (layer, inputs, serial, shape) =
                (Arc::new(layer), Arc::new(inputs), Arc::new(serial), shape.clone());
            watchdog(&name.clone(), 120, move || {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let (layer, inputs, serial, shape, name) = (&layer, &inputs, &serial, &shape, &name);
                        s.spawn(move || {
                            for r in 0..rounds {
                                let k = (t + r) % inputs.len();
                                let y = eval(layer, &inputs[k], shape);
                                assert_bits_eq(&format!("{name}: thread {t}, input {k}"), &y, &serial[k]);
                                let mut xy = inputs[k].clone();
                                layer.forward_eval_inplace(&mut xy, shape).unwrap();
                                assert_bits_eq(&format!("{name}: thread {t}, in place"), &xy, &serial[k]);
                            }
                        });
                    }
                });
            });
        }
    }
}

/// The layer called from inside `par_iter` in a user's pool (the kernels' parallel loops nest
/// in the caller's), and from inside one pool's `install` inside another's: no deadlock, and
/// the bits of the serial run (training, inference and both backwards).
#[test]
fn nested_inside_user_rayon_pools() {
    for (shape, axes, features) in cases() {
        // The detected backend and the portable one (the others' parallel structure is the same).
        let mut backends = vec![Backend::detect(), Backend::Wide];
        backends.dedup();
        for b in backends {
            let name = format!("{b} {shape:?}");
            let (layer, mut inputs) = setup(&shape, &axes, &features, b);
            inputs.truncate(3);
            let n = inputs[0].len();
            // One training step and its backward per input, each on its own clone.
            let step = move |l: &BatchNorm, x: &[f32], shape: &[usize]| -> Vec<Vec<f32>> {
                let mut l = l.clone();
                let mut y = vec![0.0; n];
                l.forward_train(x, shape, &mut y).unwrap();
                let mut dx = vec![0.0; n];
                l.backward(x, x, shape, &mut dx).unwrap();
                let mut dxe = vec![0.0; n];
                l.backward_eval(x, &y, shape, &mut dxe).unwrap();
                let ye = eval(&l, x, shape);
                vec![
                    y,
                    dx,
                    dxe,
                    ye,
                    l.running_mean().to_vec(),
                    l.running_var().to_vec(),
                    l.gamma_grad().to_vec(),
                ]
            };
            let serial: Vec<Vec<Vec<f32>>> =
                pool(1).install(|| inputs.iter().map(|x| step(&layer, x, &shape)).collect());
            let shape = shape.clone();
            let nested = watchdog(&name, 120, move || {
                let (outer, inner) = (pool(3), pool(2));
                // par_iter in the outer pool; each item calls the layer (whose kernels run on
                // the outer pool too), then does the same again through the inner pool.
                outer.install(|| {
                    inputs
                        .par_iter()
                        .map(|x| {
                            let a = step(&layer, x, &shape);
                            let b = inner.install(|| step(&layer, x, &shape));
                            let c = inner.install(|| {
                                rayon::join(
                                    || step(&layer, x, &shape),
                                    || outer.install(|| eval(&layer, x, &shape)),
                                )
                            });
                            assert_eq!(c.1.len(), n);
                            (a, b, c.0)
                        })
                        .collect::<Vec<_>>()
                })
            });
            for (k, (a, b2, c)) in nested.iter().enumerate() {
                for (what, got) in [("par_iter", a), ("install in install", b2), ("join in install", c)] {
                    for (part, (g, s)) in got.iter().zip(&serial[k]).enumerate() {
                        assert_bits_eq(&format!("{name}: {what}, input {k}, output {part}"), g, s);
                    }
                }
            }
        }
    }
}

/// Different layers trained at once from many threads (each thread its own layer), sharing the
/// global pool: every one gets the serial result.
#[test]
fn independent_layers_train_concurrently() {
    let (shape, axes, features) = cases().remove(0);
    let b = Backend::detect();
    let (layer, inputs) = setup(&shape, &axes, &features, b);
    let train = |x: &[f32]| {
        let mut l = layer.clone();
        let mut y = vec![0.0; x.len()];
        for _ in 0..2 {
            l.forward_train(x, &shape, &mut y).unwrap();
        }
        (y, l.running_mean().to_vec(), l.running_var().to_vec())
    };
    let serial: Vec<_> = inputs.iter().map(|x| train(x)).collect();
    let concurrent: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs.iter().map(|x| s.spawn(|| train(x))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, (a, b)) in serial.iter().zip(&concurrent).enumerate() {
        assert_bits_eq(&format!("layer {k}: y"), &b.0, &a.0);
        assert_bits_eq(&format!("layer {k}: running mean"), &b.1, &a.1);
        assert_bits_eq(&format!("layer {k}: running var"), &b.2, &a.2);
    }
}

/// Kernels run on the caller's pool: inside `install`, large calls never start Rayon's global
/// pool (which would add a thread per core next to the user's pool). Checked in a child process
/// of this test binary, where nothing else touches Rayon: afterwards `build_global` still
/// succeeds, which it does only while the global pool has not been started.
#[test]
fn kernels_do_not_start_the_global_pool() {
    if cfg!(miri) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // The child test's full name: this module's path within the test crate, then its own.
    let child = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::global_pool_child"),
        None => "global_pool_child".to_string(),
    };
    let out = std::process::Command::new(exe)
        .args(["--exact", &child, "--include-ignored", "--test-threads=1", "--nocapture"])
        .env("BN_GLOBAL_POOL_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("global pool untouched"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "run by kernels_do_not_start_the_global_pool in a child process"]
fn global_pool_child() {
    if std::env::var_os("BN_GLOBAL_POOL_CHILD").is_none() {
        return;
    }
    let p = pool(2);
    p.install(|| {
        for (shape, axes, features) in cases() {
            for b in Backend::available() {
                let (mut l, inputs) = setup(&shape, &axes, &features, b);
                let x = &inputs[0];
                let mut y = vec![0.0; x.len()];
                l.forward_train(x, &shape, &mut y).unwrap();
                let mut dx = vec![0.0; x.len()];
                l.backward(x, x, &shape, &mut dx).unwrap();
                l.backward_eval(x, x, &shape, &mut dx).unwrap();
                l.forward_eval(x, &shape, &mut y).unwrap();
            }
        }
    });
    drop(p);
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("the kernels started the global pool from inside a user's pool");
    println!("global pool untouched");
}
