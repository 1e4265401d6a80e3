use bn_core::kernels::{self, Backend};
use bn_core::spec::Dynamic;
use bn_core::Canonical;

fn run(dims: Canonical) {
    let b = Backend::Wide;
    let (n, c) = (dims.len(), dims.channels);
    let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.3).collect();
    let dy: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut y = vec![0.0; n];
    let mut dx = vec![0.0; n];
    let p = vec![0.5f32; c];
    let (mut m, mut v, mut s1, mut s2) = (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    kernels::forward_train::<Dynamic>(b, &x, &mut y, dims, &p, &p, 1e-5, &mut m, &mut v);
    let inv = vec![0.5f64; c];
    kernels::backward::<Dynamic>(b, &x, &dy, &mut dx, dims, &m, &inv, &p, &mut s1, &mut s2);
    kernels::normalize::<Dynamic>(b, &x, &mut y, dims, &p, &p, &p);
    let mut xy = x.clone();
    kernels::normalize_inplace::<Dynamic>(b, &mut xy, dims, &p, &p, &p);
    kernels::backward_eval::<Dynamic>(b, &x, &dy, &mut dx, dims, &p, &p, &p, &mut s1, &mut s2);
}

#[test]
fn miri_small() {
    for dims in [
        Canonical { outer: 3, channels: 5, inner: 17 },
        Canonical { outer: 40, channels: 7, inner: 1 },
        Canonical { outer: 3, channels: 20, inner: 1 },
        Canonical { outer: 2, channels: 3, inner: 9000 },
    ] {
        run(dims);
    }
}

#[test]
fn miri_parallel() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        run(Canonical { outer: 2, channels: 2, inner: 35_000 });
        run(Canonical { outer: 5000, channels: 14, inner: 1 });
    });
}
