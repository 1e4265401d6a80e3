//! Criterion benches: one group per standard shape and mode (`S2/train`, ...), comparing the
//! `#[batch_norm]` layer, the runtime-generic layer, the naive ndarray baseline and a copy of the
//! same bytes. `Throughput::Bytes` is the traffic the mode must move at least (2x the tensor
//! forward, 3x backward), so criterion reports GB/s.
//!
//! `cargo bench -p bn-bench` (a few minutes); `cargo bench -p bn-bench -- S2/eval` for one group.
//! Sample counts are small on purpose: the naive baseline takes ~0.1 s a call on the large shapes.

use std::time::Duration;

use bn_bench::bench::Workload;
use bn_bench::case::{Case, Mode};
use bn_bench::report::traffic_bytes;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

fn batchnorm(c: &mut Criterion) {
    for case in Case::all_standard() {
        for mode in Mode::ALL {
            let mut workload = match Workload::new(&case, mode, true) {
                Ok(w) => w,
                Err(e) => panic!("{} {mode}: {e}", case.name),
            };
            workload.calibrate_copy();
            let mut group = c.benchmark_group(format!("{}/{mode}", case.name));
            group.throughput(Throughput::Bytes(traffic_bytes(&case, mode)));
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
            if case.len() >= 1 << 20 {
                // Large tensors: the same iteration count per sample, not criterion's linear ramp
                // (which would need 55 calls of the naive baseline per benchmark).
                group.sampling_mode(SamplingMode::Flat);
            }
            for implementation in workload.implementations() {
                group.bench_function(implementation.name(), |b| {
                    b.iter(|| workload.run_once(implementation).expect("the workload was validated"))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, batchnorm);
criterion_main!(benches);
