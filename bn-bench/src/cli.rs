//! The command line: parsing (no panics; every error is a message and exit code 2) and the run.

use std::fmt;
use std::path::PathBuf;

use batchnorm::Layout;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{backend_name, backend_note, request_backend, BACKEND_NAMES};
use crate::bench::{Measurement, Settings, Workload};
use crate::case::{Case, Dtype, Mode, NAMED_LAYOUTS, STANDARD_SHAPES};
use crate::report::{self, Row};

/// The short usage printed after an argument error.
pub const USAGE: &str = "\
usage: bn-bench [--case S1,..] [--shape AxBx.. [--axes I,J,.. | --layout nchw|nhwc|nc|ncl]]
                [--mode train,eval,backward] [--threads N] [--backend scalar|wide|avx2|avx512]
                [--dtype f32|bf16|f16|f64] [--quick] [--epilogues] [--json PATH] [--plot PATH.svg]
                [--help]";

/// The text of `--help`.
pub const HELP: &str = "\
bn-bench: batch normalization throughput, measured against a copy of the same bytes (the
memory-bandwidth limit) and the naive ndarray port of the seed's NumPy code, in one process.

With no arguments it runs the standard shapes S1..S6 (f32) in every mode (train = training
forward, eval = inference forward, backward = backward of the training forward) with every
implementation: the #[batch_norm] layer of the shape (macro), the runtime-generic
batchnorm::BatchNorm (runtime), the naive baseline (naive) and the copy (copy: the fastest of
copy_from_slice, a Rayon-parallel chunked copy on the same threads, and the same chunks
scheduled as the training kernels schedule their tasks). Repetitions of the
implementations are interleaved; each runs until it has its time budget and minimum count.

  S1 NC   256x1024       axes 0         S4 NCHW 32x2048x7x7    axes 0,2,3
  S2 NCHW 32x64x56x56    axes 0,2,3     S5 NCL  64x128x1000    axes 0,2
  S3 NHWC 32x56x56x64    axes 0,1,2     S6 NCHW 1x64x8x8       axes 0,2,3

Options:
  --case S1,S3          only these standard shapes
  --shape 32x64x56x56   a custom shape instead (the macro layer runs too when it is a standard one)
  --axes 0,2,3          its reduced axes (the others are the feature axes, adjacent)
  --layout NAME         or its layout: nc (axes 0), ncl (0,2), nchw (0,2,3), nhwc (0,1,2);
                        default by rank: 2 nc, 3 ncl, 4 nchw
  --mode LIST           train, eval, backward (comma-separated; default all)
  --threads N           run on a Rayon pool of N threads (default: Rayon's, one per core)
  --backend NAME        force a SIMD backend (sets BN_BACKEND): scalar, wide, avx2, avx512
  --dtype NAME          the element type of the data: f32 (default), bf16, f16 (16-bit data,
                        f32 parameters), f64. The copy moves the bytes of that dtype (half of
                        f32's for bf16 and f16); the naive baseline is f32 only and is left out
                        of other dtypes; the macro layer runs for f32 and bf16
  --quick               fewer repetitions (50 ms per implementation and row instead of 400 ms)
  --epilogues           also the fused epilogues on the runtime-generic layer: relu (activation =
                        relu) and add-relu (relu(bn(x) + residual)), with x plain = their median /
                        the plain runtime layer's
  --json PATH           write one JSON record per row: case, shape, axes, mode, implementation,
                        threads, backend, median_ns, min_ns, max_ns, gbps, copy_ratio, naive_speedup
  --plot PATH.svg       draw GB/s per case and mode, one bar per implementation, copy as ceiling
  -h, --help            this text

Columns: median and min .. max of one call (calls under 10 us, as in S6, are timed in batches of
consecutive calls, each batch counted as its mean: warm calls); GB/s = bytes the mode must move
at least (2x the tensor forward: read x, write y; 3x backward: read x and dy, write dx) / median;
x copy = median / copy median (1.00x = as fast as moving the bytes, 1.50x = 50% slower);
vs naive = naive median / median; macro/rt = runtime-generic median / macro median.

Examples:
  cargo run --release -p bn-bench
  cargo run --release -p bn-bench -- --quick --json bench.json --plot bench.svg
  cargo run --release -p bn-bench -- --case S2,S3 --mode eval --threads 1
  cargo run --release -p bn-bench -- --case S2,S3,S5 --dtype bf16
  cargo run --release -p bn-bench -- --shape 8x256x28x28 --layout nchw --backend avx2
  cargo run --release -p bn-bench -- --shape 96x55x55 --axes 0

Exit status: 0 on success, 2 on bad arguments, 1 when a run fails.
";

/// An argument error: the message printed before the usage; the process exits with 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl UsageError {
    /// The exit code of an argument error.
    pub const EXIT_CODE: i32 = 2;
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The cases, in order.
    pub cases: Vec<Case>,
    /// The modes, in order.
    pub modes: Vec<Mode>,
    /// Size of the Rayon pool to run on (`None`: the global pool).
    pub threads: Option<usize>,
    /// The backend to request through `BN_BACKEND`.
    pub backend: Option<String>,
    /// The element type of the data.
    pub dtype: Dtype,
    /// Fewer repetitions.
    pub quick: bool,
    /// Also measure the fused epilogues.
    pub epilogues: bool,
    /// Where to write the JSON records.
    pub json: Option<PathBuf>,
    /// Where to write the SVG plot.
    pub plot: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cases: Case::all_standard(),
            modes: Mode::ALL.to_vec(),
            threads: None,
            backend: None,
            dtype: Dtype::F32,
            quick: false,
            epilogues: false,
            json: None,
            plot: None,
        }
    }
}

impl Options {
    /// The repetition settings of the options.
    pub fn settings(&self) -> Settings {
        if self.quick {
            Settings::QUICK
        } else {
            Settings::FULL
        }
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Print the help.
    Help,
    /// Run the benchmark.
    Run(Options),
}

/// The largest tensor `--shape` accepts, in elements (4 GiB of f32 per buffer).
pub const MAX_ELEMENTS: usize = 1 << 30;

fn err<T>(message: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(message.into()))
}

fn parse_list<T>(
    option: &str,
    value: &str,
    separator: char,
    item: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<Vec<T>, UsageError> {
    if value.trim().is_empty() {
        return err(format!("{option} needs a value ({expected})"));
    }
    value
        .split(separator)
        .map(|s| {
            let s = s.trim();
            item(s).ok_or_else(|| {
                let within =
                    if value.contains(separator) { format!(" (in `{value}`)") } else { String::new() };
                UsageError(format!("{option}: `{s}` is not {expected}{within}"))
            })
        })
        .collect()
}

fn parse_usize(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses the arguments (without the program name).
pub fn parse_args<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args = args.into_iter().map(Into::into);
    let mut seen: Vec<String> = Vec::new();
    let mut shape: Option<Vec<usize>> = None;
    let mut axes: Option<Vec<usize>> = None;
    let mut layout: Option<&'static [usize]> = None;
    let mut case_names: Option<Vec<Case>> = None;
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !name.starts_with('-') {
            return err(format!("unexpected argument `{arg}` (options start with --)"));
        }
        const FLAGS: [&str; 2] = ["--quick", "--epilogues"];
        const VALUED: [&str; 11] = [
            "--case",
            "--shape",
            "--axes",
            "--layout",
            "--mode",
            "--threads",
            "--backend",
            "--dtype",
            "--json",
            "--plot",
            "--cases",
        ];
        if !FLAGS.contains(&name.as_str()) && !VALUED.contains(&name.as_str()) {
            return err(format!(
                "unknown option `{name}`; the options are --case, --shape, --axes, --layout, --mode, \
                 --threads, --backend, --dtype, --quick, --epilogues, --json, --plot, --help"
            ));
        }
        let canonical = if name == "--cases" { "--case".to_string() } else { name.clone() };
        if seen.contains(&canonical) {
            return err(format!("{canonical} is given twice"));
        }
        seen.push(canonical.clone());
        if FLAGS.contains(&name.as_str()) {
            if inline.is_some() {
                return err(format!("{name} takes no value"));
            }
            if name == "--epilogues" {
                options.epilogues = true;
            } else {
                options.quick = true;
            }
            continue;
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return err(format!("{name} needs a value")),
        };
        match canonical.as_str() {
            "--case" => {
                let cases = parse_list(
                    "--case",
                    &value,
                    ',',
                    |s| STANDARD_SHAPES.iter().find(|c| c.name.eq_ignore_ascii_case(s)).map(Case::standard),
                    "a standard shape S1..S6",
                )?;
                case_names = Some(cases);
            }
            "--shape" => {
                let s = parse_list("--shape", &value, 'x', parse_usize, "a positive integer extent")?;
                if s.contains(&0) {
                    return err(format!("--shape: extents must be positive, got `{value}`"));
                }
                if s.len() < 2 {
                    return err(format!(
                        "--shape: need at least 2 axes (reduced and feature), got `{value}`"
                    ));
                }
                let elements = s.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e));
                if elements.is_none_or(|n| n > MAX_ELEMENTS) {
                    return err(format!("--shape: `{value}` has more than {MAX_ELEMENTS} elements"));
                }
                shape = Some(s);
            }
            "--axes" => axes = Some(parse_list("--axes", &value, ',', parse_usize, "an axis index")?),
            "--layout" => {
                let lower = value.to_ascii_lowercase();
                match NAMED_LAYOUTS.iter().find(|(n, _, _)| *n == lower) {
                    Some(&(_, _, a)) => layout = Some(a),
                    None => return err(format!("--layout: `{value}` is not one of nchw, nhwc, nc, ncl")),
                }
            }
            "--mode" => {
                let mut modes =
                    parse_list("--mode", &value, ',', Mode::from_name, "train, eval or backward")?;
                modes.sort();
                modes.dedup();
                options.modes = modes;
            }
            "--threads" => match parse_usize(&value) {
                Some(n) if (1..=4096).contains(&n) => options.threads = Some(n),
                _ => return err(format!("--threads: `{value}` is not a thread count from 1 to 4096")),
            },
            "--backend" => match value.parse::<batchnorm::Backend>() {
                Ok(backend) => options.backend = Some(backend.name().to_string()),
                Err(_) => {
                    return err(format!("--backend: `{value}` is not one of {}", BACKEND_NAMES.join(", ")))
                }
            },
            "--dtype" => match Dtype::from_name(&value) {
                Some(dtype) => options.dtype = dtype,
                None => return err(format!("--dtype: `{value}` is not one of f32, bf16, f16, f64")),
            },
            "--json" => {
                if value.is_empty() {
                    return err("--json needs a path");
                }
                options.json = Some(PathBuf::from(value));
            }
            "--plot" => {
                if !value.to_ascii_lowercase().ends_with(".svg") || value.len() <= 4 {
                    return err(format!(
                        "--plot: the plot is an SVG file, give a path ending in .svg (got `{value}`)"
                    ));
                }
                options.plot = Some(PathBuf::from(value));
            }
            _ => unreachable!("every valued option is handled"),
        }
    }
    if axes.is_some() && layout.is_some() {
        return err("give --axes or --layout, not both");
    }
    match shape {
        None => {
            if axes.is_some() || layout.is_some() {
                return err("--axes and --layout describe a --shape; give the shape too");
            }
            if let Some(cases) = case_names {
                options.cases = cases;
                options.cases.dedup();
            }
        }
        Some(shape) => {
            if case_names.is_some() {
                return err("give --case or --shape, not both");
            }
            let rank = shape.len();
            let axes = match (axes, layout) {
                (Some(a), _) => a,
                (None, Some(a)) => {
                    let (name, layout_rank, _) =
                        NAMED_LAYOUTS.iter().find(|(_, _, x)| *x == a).expect("layout from the table");
                    if *layout_rank != rank {
                        return err(format!(
                            "--layout {name} is for rank {layout_rank}, but --shape has {rank} axes"
                        ));
                    }
                    a.to_vec()
                }
                (None, None) => match NAMED_LAYOUTS.iter().find(|(n, r, _)| *r == rank && *n != "nhwc") {
                    Some((_, _, a)) => a.to_vec(),
                    None => {
                        return err(format!("--shape has rank {rank}: give its reduced axes with --axes"))
                    }
                },
            };
            let mut sorted = axes.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != axes.len() {
                return err(format!("--axes: an axis is given twice in {axes:?}"));
            }
            if let Some(&a) = sorted.iter().find(|&&a| a >= rank) {
                return err(format!("--axes: axis {a} is out of range for --shape of rank {rank}"));
            }
            let case = Case::new(shape, sorted);
            Layout::from_axes(&case.features(), &case.axes).map_err(|e| {
                UsageError(format!("--shape {} with axes {:?}: {e}", case.shape_string(), case.axes))
            })?;
            let trains = options.modes.iter().any(|&m| m != Mode::Eval);
            if trains && case.per_feature() < 2 {
                return err(format!(
                    "--shape {} with axes {:?} has 1 value per feature; training (and its backward) needs \
                     at least 2 (use --mode eval)",
                    case.shape_string(),
                    case.axes
                ));
            }
            options.cases = vec![case];
        }
    }
    let dtype = options.dtype;
    options.cases = options.cases.into_iter().map(|c| c.with_dtype(dtype)).collect();
    Ok(Command::Run(options))
}

/// Why a run failed (after the arguments were accepted).
#[derive(Debug)]
pub enum RunError {
    /// A layer returned an error.
    Layer(String),
    /// The Rayon pool could not be built.
    ThreadPool(String),
    /// Writing the JSON or the plot failed.
    Output(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Layer(m) | RunError::ThreadPool(m) | RunError::Output(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RunError {}

/// The result of a run: the rows and the table as printed.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// One row per (case, mode, implementation).
    pub rows: Vec<Row>,
    /// The table.
    pub table: String,
}

/// Runs the benchmark the options describe (see [`write_outputs`] for `--json` and `--plot`).
/// Shows a progress bar on stderr when `progress` is true (and stderr is a terminal).
pub fn run(options: &Options, progress: bool) -> Result<RunOutput, RunError> {
    if let Some(backend) = &options.backend {
        request_backend(backend);
    }
    let measure = || -> Result<(Vec<Measurement>, usize), RunError> {
        let threads = rayon::current_num_threads();
        let total = (options.cases.len() * options.modes.len()) as u64;
        let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        if progress {
            bar.enable_steady_tick(std::time::Duration::from_millis(250));
        }
        let settings = options.settings();
        let mut measurements = Vec::new();
        for case in &options.cases {
            for &mode in &options.modes {
                bar.set_message(format!("{} {mode}", case.name));
                let row = Workload::with_epilogues(case, mode, true, options.epilogues)
                    .and_then(|mut w| w.measure(&settings))
                    .map_err(|e| RunError::Layer(format!("{} {mode}: {e}", case.name)))?;
                measurements.extend(row);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok((measurements, threads))
    };
    let (measurements, threads) = match options.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| RunError::ThreadPool(format!("cannot build a pool of {n} threads: {e}")))?
            .install(measure)?,
        None => measure()?,
    };
    let backend = backend_name();
    let rows = report::rows(&measurements, threads, &backend);
    let mut table = report::table(&rows, &options.cases, threads, &backend);
    if let Some(note) = backend_note() {
        table = format!("note: {note}\n{table}");
    }
    Ok(RunOutput { rows, table })
}

/// Writes the `--json` records and the `--plot` SVG the options ask for.
pub fn write_outputs(options: &Options, out: &RunOutput) -> Result<(), RunError> {
    if let Some(path) = &options.json {
        report::write_json(path, &out.rows)
            .map_err(|e| RunError::Output(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("wrote json: {}", path.display());
    }
    if let Some(path) = &options.plot {
        let (threads, backend) = out.rows.first().map_or((0, ""), |r| (r.threads, r.backend.as_str()));
        let dtype = options.dtype;
        let title = format!("bn-bench, {dtype}, {threads} thread(s), backend {backend}");
        crate::plot::write_svg(path, &out.rows, &title)
            .map_err(|e| RunError::Output(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("wrote plot: {}", path.display());
    }
    Ok(())
}

/// The whole command: parses `args` (without the program name), runs, prints the table on
/// stdout and errors on stderr, and returns the exit code (0, 1 for a failed run, 2 for bad
/// arguments).
pub fn main_with_args<I, S>(args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    match parse_args(args) {
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}\n\nRun `bn-bench --help` for the options and examples.");
            UsageError::EXIT_CODE
        }
        Ok(Command::Help) => {
            print!("{HELP}");
            0
        }
        Ok(Command::Run(options)) => {
            let result = run(&options, true).and_then(|out| {
                print!("{}", out.table);
                write_outputs(&options, &out)
            });
            match result {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
    }
}
