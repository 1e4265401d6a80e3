//! The measuring loop: every implementation of one (case, mode) on the same inputs, interleaved
//! repetition by repetition so that drift (frequency, other processes) hits them alike, each
//! repeated until it has used its time budget.

use std::hint::black_box;
use std::time::{Duration, Instant};

use batchnorm::BnError;
use ndarray::{ArrayViewD, IxDyn};
use rayon::prelude::*;

use crate::case::Dtype;
use crate::case::{Case, Implementation, Mode};
use crate::layers::{macro_runner, runtime_runner, runtime_runner_with, Inputs, Runner};
use crate::naive::NaiveBatchNorm;

/// How long each implementation of a row is repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time each implementation of a row runs for (timed repetitions only), once it has its
    /// minimum number of repetitions.
    pub budget: Duration,
    /// Minimum timed repetitions of the layers and the copy.
    pub min_reps: usize,
    /// Minimum timed repetitions of the naive baseline (it is much slower).
    pub naive_min_reps: usize,
    /// Maximum timed repetitions of anything.
    pub max_reps: usize,
}

impl Settings {
    /// The default run: 0.4 s per implementation and row, at least 5 repetitions (naive: 3).
    pub const FULL: Settings =
        Settings { budget: Duration::from_millis(400), min_reps: 5, naive_min_reps: 3, max_reps: 20_000 };
    /// `--quick`: 50 ms per implementation and row, at least 3 repetitions (naive: 2).
    pub const QUICK: Settings =
        Settings { budget: Duration::from_millis(50), min_reps: 3, naive_min_reps: 2, max_reps: 2_000 };
}

/// The least time one timed repetition takes: faster implementations repeat their call within
/// a repetition until it does (see [`Workload::measure`]).
pub const MIN_SAMPLE: Duration = Duration::from_micros(10);

/// Untimed calls whose fastest decides an implementation's [`batch`].
pub const BATCH_PROBES: usize = 5;

/// Calls per timed repetition for an implementation whose one (warm-up) call took `once`: enough
/// for [`MIN_SAMPLE`], at most 1000; 1 for calls of [`MIN_SAMPLE`] or longer.
pub fn batch(once: Duration) -> u32 {
    let once = once.as_nanos().max(1);
    MIN_SAMPLE.as_nanos().div_ceil(once).clamp(1, 1000) as u32
}

/// Median and spread of the timed repetitions of one implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Median time of one repetition, in nanoseconds.
    pub median_ns: u64,
    /// Fastest repetition, in nanoseconds.
    pub min_ns: u64,
    /// Slowest repetition, in nanoseconds.
    pub max_ns: u64,
    /// Number of timed repetitions.
    pub reps: usize,
}

impl Timing {
    /// Median, min and max of `samples` (which must not be empty).
    pub fn from_samples(samples: &[Duration]) -> Timing {
        let mut ns: Vec<u64> = samples.iter().map(|d| d.as_nanos().min(u64::MAX as u128) as u64).collect();
        ns.sort_unstable();
        let n = ns.len();
        assert!(n > 0, "a timing needs at least one sample");
        let median = if n % 2 == 1 { ns[n / 2] } else { ns[n / 2 - 1] / 2 + ns[n / 2] / 2 };
        Timing { median_ns: median.max(1), min_ns: ns[0], max_ns: ns[n - 1], reps: n }
    }
}

/// One measured row.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The case.
    pub case: Case,
    /// The mode.
    pub mode: Mode,
    /// Who ran it.
    pub implementation: Implementation,
    /// Its timing.
    pub timing: Timing,
}

/// The copy the bandwidth reference uses: `copy_from_slice`, or the same split into chunks copied
/// in parallel on the current Rayon pool, handed to it or helped (the faster is the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// One `copy_from_slice`.
    Serial,
    /// Chunks of [`COPY_CHUNK`] elements copied in parallel on the current Rayon pool.
    Parallel,
    /// The same chunks scheduled as the training and backward kernels schedule their tasks:
    /// the calling thread copies while helpers from the pool join it (the parallel copy hands
    /// the work to the pool and sleeps until it is done, which costs the wake-ups of sleeping
    /// workers).
    Helped,
}

/// Elements per chunk of the parallel copy (256 KiB of f32).
pub const COPY_CHUNK: usize = 64 * 1024;

/// Copies `src` into `dst` (same length) the given way.
pub fn copy(kind: CopyKind, src: &[f32], dst: &mut [f32]) {
    match kind {
        CopyKind::Serial => dst.copy_from_slice(src),
        CopyKind::Parallel => dst
            .par_chunks_mut(COPY_CHUNK)
            .zip(src.par_chunks(COPY_CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s)),
        CopyKind::Helped => batchnorm::kernels::__copy_scheduled(src, dst, COPY_CHUNK),
    }
}

/// The copy's source and destination in one allocation, each starting on a 4 KiB boundary.
///
/// Two buffers from separate small allocations usually sit a few bytes apart modulo 4 KiB
/// (the allocator's header), and a copy whose loads follow its stores at such a distance
/// stalls on every vector: the CPU guesses a store-to-load dependency from the low 12 address
/// bits (4K aliasing). Measured on an AMD Zen 3 VM: 16 KiB copied in 8.7 us with the
/// destination 16 bytes past the source modulo 4 KiB, 0.22 us page-aligned. Large tensors
/// (the layers' inputs and outputs) come from `mmap` with the same offset in their pages, so
/// page-aligned buffers are what the layers see too.
pub struct CopyBuffers {
    buf: Vec<f32>,
    src: usize,
    dst: usize,
    len: usize,
}

/// Values per 4 KiB page.
const PAGE_VALUES: usize = 1024;

impl CopyBuffers {
    /// A source holding `src` (copied in) and a destination of the same length.
    pub fn new(src: &[f32]) -> CopyBuffers {
        let len = src.len();
        let stride = len.div_ceil(PAGE_VALUES) * PAGE_VALUES;
        let mut buf = vec![0.0f32; PAGE_VALUES - 1 + stride + len];
        let misaligned = (buf.as_ptr() as usize / 4) % PAGE_VALUES;
        let start = (PAGE_VALUES - misaligned) % PAGE_VALUES;
        buf[start..start + len].copy_from_slice(src);
        CopyBuffers { buf, src: start, dst: start + stride, len }
    }

    /// The source and the destination.
    pub fn split(&mut self) -> (&[f32], &mut [f32]) {
        let (head, tail) = self.buf.split_at_mut(self.dst);
        (&head[self.src..self.src + self.len], &mut tail[..self.len])
    }
}

/// Deterministic pseudo-random data, about `offset + U(-1, 1)` (xorshift64*).
pub fn fill(len: usize, seed: u64, offset: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 random bits
            offset + (bits as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// `v` as a tensor of `shape`.
fn view<'a>(shape: &[usize], v: &'a [f32]) -> ArrayViewD<'a, f32> {
    ArrayViewD::from_shape(IxDyn(shape), v).expect("buffers have the case's shape")
}

/// What one timed repetition runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// `layers[i]`.
    Layer(usize),
    Naive,
    Copy(CopyKind),
}

/// The inputs and the state of every implementation for one (case, mode).
pub struct Workload {
    case: Case,
    mode: Mode,
    x: Vec<f32>,
    dy: Vec<f32>,
    /// The layers, each with its inputs and output in the case's dtype.
    layers: Vec<(Implementation, Box<dyn Runner>)>,
    naive: Option<NaiveBatchNorm>,
    copy: CopyBuffers,
    /// The copy [`Workload::run_once`] runs for [`Implementation::Copy`].
    copy_kind: CopyKind,
}

impl Workload {
    /// Builds the inputs and the layers of a row, and brings every layer into the state the mode
    /// needs (a training forward before inference and backward, non-trivial parameters).
    ///
    /// `with_naive` adds the naive baseline (`f32` cases only: it is an `f32` program); the macro
    /// layer is added when the case is a standard shape of a dtype that has one (`f32`, `bf16`).
    /// The copy moves as many bytes as the mode must move in the case's dtype.
    pub fn new(case: &Case, mode: Mode, with_naive: bool) -> Result<Workload, BnError> {
        Self::with_epilogues(case, mode, with_naive, false)
    }

    /// [`Workload::new`], with the fused epilogues ([`Implementation::Relu`] and
    /// [`Implementation::AddRelu`]) too when `epilogues`.
    pub fn with_epilogues(
        case: &Case,
        mode: Mode,
        with_naive: bool,
        epilogues: bool,
    ) -> Result<Workload, BnError> {
        let len = case.len();
        let features: usize = case.features().iter().product();
        let x = fill(len, 1, 0.5);
        let dy = fill(len, 2, 0.0);
        let gamma: Vec<f32> = (0..features).map(|c| 1.0 + 0.25 * ((c % 7) as f32 / 7.0)).collect();
        let beta: Vec<f32> = (0..features).map(|c| 0.1 * ((c % 5) as f32 - 2.0)).collect();
        let residual = epilogues.then(|| fill(len, 4, 0.0));
        let inputs = Inputs::new(case.dtype, &x, &dy, residual.as_deref());
        let mut layers = Vec::new();
        if let Some(layer) = macro_runner(case, &inputs) {
            layers.push((Implementation::Macro, layer));
        }
        layers.push((Implementation::Runtime, runtime_runner(case, &inputs)?));
        if epilogues {
            let relu = batchnorm::Config::new().activation(batchnorm::Activation::Relu);
            layers.push((Implementation::Relu, runtime_runner_with(case, relu, &inputs, false)?));
            let plain = batchnorm::Config::new();
            layers.push((Implementation::AddRelu, runtime_runner_with(case, plain, &inputs, true)?));
        }
        for (_, layer) in &mut layers {
            layer.prepare(&gamma, &beta, &case.shape)?;
        }
        let naive = if with_naive && case.dtype == Dtype::F32 {
            let config = batchnorm::Config::new();
            let mut naive = NaiveBatchNorm::new(
                &case.shape,
                &case.axes,
                config.get_momentum(),
                config.get_eps(),
                config.get_running_var() == batchnorm::RunningVar::Unbiased,
            )
            .expect("the case's axes were validated by the runtime layer");
            naive.update_params(&gamma, &beta);
            black_box(naive.forward_train(view(&case.shape, &x)));
            Some(naive)
        } else {
            None
        };
        // The copy reads and writes `copy_len` f32s: the bytes the mode moves in the case's dtype.
        let copy_len = (len * case.dtype.bytes() * mode.traffic_factor()).div_ceil(8);
        Ok(Workload {
            case: case.clone(),
            mode,
            x,
            dy,
            layers,
            naive,
            copy: CopyBuffers::new(&fill(copy_len, 3, 0.0)),
            copy_kind: if rayon::current_num_threads() > 1 { CopyKind::Parallel } else { CopyKind::Serial },
        })
    }

    /// The implementations this workload has, in table order.
    pub fn implementations(&self) -> Vec<Implementation> {
        let mut out: Vec<Implementation> = self.layers.iter().map(|l| l.0).collect();
        if self.naive.is_some() {
            out.push(Implementation::Naive);
        }
        out.push(Implementation::Copy);
        out
    }

    /// Times a few copies of each kind and keeps the faster for [`Workload::run_once`].
    pub fn calibrate_copy(&mut self) -> CopyKind {
        let mut best = (Duration::MAX, self.copy_kind);
        for kind in [CopyKind::Serial, CopyKind::Parallel, CopyKind::Helped] {
            let mut samples = Vec::new();
            for _ in 0..5 {
                let start = Instant::now();
                let (src, dst) = self.copy.split();
                copy(kind, src, dst);
                samples.push(start.elapsed());
            }
            let median = Duration::from_nanos(Timing::from_samples(&samples).median_ns);
            if median < best.0 {
                best = (median, kind);
            }
        }
        self.copy_kind = best.1;
        best.1
    }

    /// Runs one call of `implementation` in the workload's mode (for criterion). Implementations
    /// the workload lacks do nothing.
    pub fn run_once(&mut self, implementation: Implementation) -> Result<(), BnError> {
        let job = match implementation {
            Implementation::Naive if self.naive.is_some() => Job::Naive,
            Implementation::Copy => Job::Copy(self.copy_kind),
            imp => match self.layers.iter().position(|l| l.0 == imp) {
                Some(i) => Job::Layer(i),
                None => return Ok(()),
            },
        };
        self.run(job)
    }

    fn jobs(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = (0..self.layers.len()).map(Job::Layer).collect();
        if self.naive.is_some() {
            jobs.push(Job::Naive);
        }
        jobs.push(Job::Copy(CopyKind::Serial));
        jobs.push(Job::Copy(CopyKind::Parallel));
        jobs.push(Job::Copy(CopyKind::Helped));
        jobs
    }

    fn run(&mut self, job: Job) -> Result<(), BnError> {
        let shape = &self.case.shape;
        match job {
            Job::Layer(i) => self.layers[i].1.run(self.mode, shape)?,
            Job::Naive => {
                let naive = self.naive.as_mut().expect("the naive job exists only with a naive layer");
                // The result is allocated and dropped on every call, as in NumPy.
                match self.mode {
                    Mode::Train => drop(black_box(naive.forward_train(view(shape, &self.x)))),
                    Mode::Eval => drop(black_box(naive.forward_eval(view(shape, &self.x)))),
                    Mode::Backward => drop(black_box(naive.backward(view(shape, &self.dy)))),
                }
            }
            Job::Copy(kind) => {
                let (src, dst) = self.copy.split();
                copy(kind, src, dst);
                black_box(dst);
            }
        }
        Ok(())
    }

    /// Runs the row: one untimed warm-up repetition of everything, then timed repetitions,
    /// interleaved (in an order shuffled every round), until every implementation has its minimum repetitions and its budget.
    /// The copy is reported as the fastest (by median) of its variants.
    ///
    /// A repetition is one call, or, for an implementation whose call takes less than
    /// [`MIN_SAMPLE`] (the latency case S6), [`batch`] consecutive calls timed together and
    /// counted as their mean: the targets define S6 by warm calls, where one call timed alone
    /// after another implementation measures the timer and what that implementation left in the
    /// caches and predictors.
    pub fn measure(&mut self, settings: &Settings) -> Result<Vec<Measurement>, BnError> {
        let jobs = self.jobs();
        for &job in &jobs {
            self.run(job)?;
        }
        // The batch size follows the fastest of a few calls: one call alone can be slowed by
        // an interrupt or a neighbour on a shared machine, and would then leave a fast
        // implementation timed one call at a time.
        let mut calls = Vec::with_capacity(jobs.len());
        for &job in &jobs {
            let mut fastest = Duration::MAX;
            for _ in 0..BATCH_PROBES {
                let start = Instant::now();
                self.run(job)?;
                fastest = fastest.min(start.elapsed());
            }
            calls.push(batch(fastest));
        }
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); jobs.len()];
        let mut spent = vec![Duration::ZERO; jobs.len()];
        // Every round runs the jobs in a new pseudo-random order, so each implementation follows
        // each other about equally often and what the previous call left in the caches favours
        // none. (Rotating one fixed cycle would not: every job would keep its predecessor.)
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        loop {
            for i in (1..order.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, ((state >> 33) % (i as u64 + 1)) as usize);
            }
            let mut ran = false;
            for &j in &order {
                let job = jobs[j];
                let min = if job == Job::Naive { settings.naive_min_reps } else { settings.min_reps };
                let reps = samples[j].len();
                if reps >= settings.max_reps || (reps >= min.max(1) && spent[j] >= settings.budget) {
                    continue;
                }
                ran = true;
                let start = Instant::now();
                for _ in 0..calls[j] {
                    self.run(job)?;
                }
                let elapsed = start.elapsed();
                samples[j].push(elapsed / calls[j]);
                spent[j] += elapsed;
            }
            if !ran {
                break;
            }
        }
        let mut out = Vec::new();
        let mut best_copy: Option<Timing> = None;
        for (&job, s) in jobs.iter().zip(&samples) {
            let timing = Timing::from_samples(s);
            let implementation = match job {
                Job::Layer(i) => self.layers[i].0,
                Job::Naive => Implementation::Naive,
                Job::Copy(_) => {
                    if best_copy.is_none_or(|b| timing.median_ns < b.median_ns) {
                        best_copy = Some(timing);
                    }
                    continue;
                }
            };
            out.push(Measurement { case: self.case.clone(), mode: self.mode, implementation, timing });
        }
        if let Some(timing) = best_copy {
            out.push(Measurement {
                case: self.case.clone(),
                mode: self.mode,
                implementation: Implementation::Copy,
                timing,
            });
        }
        out.sort_by_key(|m| m.implementation);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_buffers_are_page_aligned_and_disjoint() {
        for len in [0, 1, 7, 1000, 1024, 1025, 4096, 70_000] {
            let src = fill(len, 9, 0.0);
            let mut buffers = CopyBuffers::new(&src);
            let (s, d) = buffers.split();
            assert_eq!(s, &src[..], "len {len}: the source holds the values given");
            assert_eq!(d.len(), len);
            if len > 0 {
                let (sa, da) = (s.as_ptr() as usize, d.as_ptr() as usize);
                assert_eq!(sa % 4096, 0, "len {len}: source not on a page boundary");
                assert_eq!(da % 4096, 0, "len {len}: destination not on a page boundary");
                assert!(da >= sa + 4 * len, "len {len}: the buffers overlap");
            }
        }
    }

    #[test]
    fn short_calls_are_batched_to_the_minimum_sample() {
        assert_eq!(batch(MIN_SAMPLE), 1);
        assert_eq!(batch(Duration::from_millis(3)), 1);
        assert_eq!(batch(Duration::from_nanos(1)), 1000);
        assert_eq!(batch(Duration::ZERO), 1000);
        for ns in [300, 1_999, 2_000, 2_001, 7_000, 9_999, 10_001] {
            let once = Duration::from_nanos(ns);
            let n = batch(once);
            assert!(once * n >= MIN_SAMPLE, "{ns} ns x {n} calls is under the minimum sample");
            assert!(once * (n - 1) < MIN_SAMPLE, "{ns} ns x {n} calls: one call fewer would do");
        }
    }
}
