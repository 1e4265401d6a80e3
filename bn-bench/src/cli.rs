//! The command line, on clap's derive API: the options, the checks across them, and the run.
//! Every argument error is clap's: a message, the usage, exit code 2; never a panic.

use std::fmt;
use std::path::PathBuf;

use batchnorm::Layout;
use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{backend_name, backend_note, request_backend, BACKEND_NAMES};
use crate::bench::{Measurement, Settings, Workload};
use crate::case::{Case, Dtype, Mode, NAMED_LAYOUTS, STANDARD_SHAPES};
use crate::markdown::MarkdownOptions;
use crate::report::{self, Row};
use crate::suite::Suite;

/// The first paragraph of `--help` and the one line of `-h`-less contexts (error hints).
const ABOUT: &str = "Batch normalization throughput, measured against a copy of the same bytes \
                     and the naive ndarray baseline, in one process";

/// What `--help` says before the options.
const LONG_ABOUT: &str = "\
bn-bench: batch normalization throughput, measured against a copy of the same bytes (the
memory-bandwidth limit) and the naive ndarray port of the NumPy reference class, in one process.

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

--suite resnet50 runs the batch-norm layers of ResNet-50 at batch 50 instead, NCHW, as oneDNN's
benchdnn lists them (inputs/bnorm/bnorm_resnet_50), each with how many of the network's 53
layers have its shape:

  R1 50x64x112x112  x1     R4 50x512x28x28   x5     R7 50x256x14x14  x12
  R2 50x256x56x56   x4     R5 50x128x28x28   x8     R8 50x2048x7x7   x4
  R3 50x64x56x56    x6     R6 50x1024x14x14  x7     R9 50x512x7x7    x6

with the runtime-generic layer and the copy only (the macro layer needs each shape compiled in,
and the naive baseline would take most of the run on tensors of up to 160 MB). After the table
a summary line gives the batch-norm time of one training step (training forward + backward of
the 53 layers, each shape weighted by its count) and of one inference pass, against the copy
weighted the same way, and against PyTorch with --torch.";

/// What `--help` says after the options.
const AFTER_LONG_HELP: &str = "\
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
  cargo run --release -p bn-bench -- --suite resnet50 --threads 2 --json rn50.json
  python3 bn-bench/scripts/torch_bench.py --suite resnet50 --threads 2 --json rn50-torch.json
  cargo run --release -p bn-bench -- --suite resnet50 --threads 2 --torch rn50-torch.json
  cargo run --release -p bn-bench -- markdown --from bench.json --torch torch.json

Exit status: 0 on success, 2 on bad arguments, 1 when a run fails.";

/// The command line as clap parses it; [`RunArgs::into_options`] checks it as a whole.
#[derive(Debug, Parser)]
#[command(
    name = "bn-bench",
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    after_help = "Run `bn-bench --help` for what is measured, the columns and examples.",
    disable_help_flag = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<SubCommand>,
    /// Print this help (-h and --help alike)
    #[arg(short = 'h', long = "help", action = ArgAction::HelpLong, global = true)]
    help: Option<bool>,
}

/// What runs instead of a benchmark.
#[derive(Debug, clap::Subcommand)]
enum SubCommand {
    /// Print the Markdown performance table of a --json run (and PyTorch's beside it)
    ///
    /// Print the Markdown performance table of a --json run: per case, the time
    /// of our layer in each mode, its ratio to the copy of the same run and,
    /// with --torch, PyTorch's time over ours; a header line with the commands
    /// and the CPU that made the records, and the summary line of a --suite run.
    #[command(verbatim_doc_comment)]
    Markdown(MarkdownOptions),
}

/// The options of a run.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Only these standard shapes (comma-separated: S1..S6)
    #[arg(long, alias = "cases", value_name = "S1,S3", value_parser = parse_cases)]
    #[arg(conflicts_with_all = ["shape", "suite"])]
    case: Option<::std::vec::Vec<Case>>,

    /// A custom shape instead (the macro layer runs too when it is a standard one)
    #[arg(long, value_name = "32x64x56x56", value_parser = parse_shape, conflicts_with = "suite")]
    shape: Option<::std::vec::Vec<usize>>,

    /// Its reduced axes (the others are the feature axes, adjacent)
    #[arg(long, value_name = "0,2,3", value_parser = parse_axes)]
    #[arg(requires = "shape", conflicts_with = "layout")]
    axes: Option<::std::vec::Vec<usize>>,

    /// Or its layout: nc (axes 0), ncl (0,2), nchw (0,2,3), nhwc (0,1,2)
    ///
    /// Default by rank: 2 nc, 3 ncl, 4 nchw
    #[arg(long, value_name = "NAME", value_parser = parse_layout, requires = "shape", verbatim_doc_comment)]
    layout: Option<NamedLayout>,

    /// The modes: train, eval, backward (comma-separated; default all)
    #[arg(long, value_name = "LIST", value_parser = parse_modes)]
    mode: Option<::std::vec::Vec<Mode>>,

    /// Run on a Rayon pool of N threads (default: Rayon's, one per core)
    #[arg(long, value_name = "N", value_parser = parse_threads)]
    threads: Option<usize>,

    /// Force a SIMD backend (sets BN_BACKEND): scalar, wide, avx2, avx512
    #[arg(long, value_name = "NAME", value_parser = parse_backend)]
    backend: Option<String>,

    /// The element type of the data: f32 (default), bf16, f16, f64
    ///
    /// bf16 and f16 are 16-bit data with f32 parameters. The copy moves the
    /// bytes of that dtype (half of f32's for bf16 and f16); the naive baseline
    /// is f32 only and is left out of other dtypes; the macro layer runs for
    /// f32 and bf16
    #[arg(long, value_name = "NAME", value_parser = parse_dtype, verbatim_doc_comment)]
    dtype: Option<Dtype>,

    /// A network's batch-norm layers instead of the standard shapes (see above)
    ///
    /// The runtime layer and the copy of each layer's shape, then a summary line
    #[arg(long, value_name = "NAME", value_enum, verbatim_doc_comment)]
    suite: Option<Suite>,

    /// PyTorch's records of the same suite, for the summary line
    ///
    /// Written by torch_bench.py --suite NAME --json FILE; the summary line
    /// then also gives PyTorch's time of a training step and an inference pass,
    /// over ours
    #[arg(long, value_name = "FILE", requires = "suite", verbatim_doc_comment)]
    torch: Option<PathBuf>,

    /// Fewer repetitions (50 ms per implementation and row instead of 400 ms)
    #[arg(long)]
    quick: bool,

    /// Also the fused epilogues on the runtime-generic layer: relu and add-relu
    ///
    /// relu: activation = relu; add-relu: relu(bn(x) + residual). Column
    /// x plain = their median / the plain runtime layer's
    #[arg(long, verbatim_doc_comment)]
    epilogues: bool,

    /// Write one JSON record per row
    ///
    /// The fields: case, shape, axes, dtype, mode, implementation, threads,
    /// backend, median_ns, min_ns, max_ns, gbps, copy_ratio, naive_speedup,
    /// command (the command line, as bn-bench spells it) and cpu (the CPU's
    /// model name)
    #[arg(long, value_name = "PATH", value_parser = parse_json_path, verbatim_doc_comment)]
    json: Option<PathBuf>,

    /// Draw GB/s per case and mode, one bar per implementation, copy as ceiling
    #[arg(long, value_name = "PATH.svg", value_parser = parse_svg_path)]
    plot: Option<PathBuf>,
}

/// An argument error: clap's message (with the usage) as printed; the process exits with 2.
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
    /// The suite the cases are, if any: no naive baseline, and a summary line.
    pub suite: Option<Suite>,
    /// PyTorch's records of the suite, for the summary line.
    pub torch: Option<PathBuf>,
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
            suite: None,
            torch: None,
        }
    }
}

/// `value` as one shell word (quoted when it has characters a shell would read).
fn shell_word(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,=:+@%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

impl Options {
    /// The command line that runs these options, spelled the same way for the same options
    /// (the records of `--json` carry it): `bn-bench --case S1,S3 --quick --json out.json`.
    pub fn command_line(&self) -> String {
        let mut words = vec!["bn-bench".to_string()];
        let mut push = |option: &str, value: Option<String>| {
            words.push(option.to_string());
            words.extend(value.map(|v| shell_word(&v)));
        };
        let join = |items: &[String], separator: &str| items.join(separator);
        match self.cases.as_slice() {
            _ if self.suite.is_some() => push("--suite", self.suite.map(|s| s.name().to_string())),
            [case] if case.standard_shape().is_none() => {
                let axes: Vec<String> = case.axes.iter().map(|a| a.to_string()).collect();
                push("--shape", Some(case.shape_string()));
                push("--axes", Some(join(&axes, ",")));
            }
            cases if cases.iter().map(|c| &c.name).ne(Case::all_standard().iter().map(|c| &c.name)) => {
                let names: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
                push("--case", Some(join(&names, ",")));
            }
            _ => {}
        }
        if self.modes != Mode::ALL {
            let names: Vec<String> = self.modes.iter().map(|m| m.name().to_string()).collect();
            push("--mode", Some(join(&names, ",")));
        }
        if let Some(n) = self.threads {
            push("--threads", Some(n.to_string()));
        }
        if let Some(backend) = &self.backend {
            push("--backend", Some(backend.clone()));
        }
        if self.dtype != Dtype::F32 {
            push("--dtype", Some(self.dtype.name().to_string()));
        }
        if self.quick {
            push("--quick", None);
        }
        if self.epilogues {
            push("--epilogues", None);
        }
        if let Some(path) = &self.json {
            push("--json", Some(path.display().to_string()));
        }
        if let Some(path) = &self.plot {
            push("--plot", Some(path.display().to_string()));
        }
        if let Some(path) = &self.torch {
            push("--torch", Some(path.display().to_string()));
        }
        words.join(" ")
    }

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
    /// Print the Markdown table of recorded runs (`bn-bench markdown`).
    Markdown(MarkdownOptions),
}

/// The largest tensor `--shape` accepts, in elements (4 GiB of f32 per buffer).
pub const MAX_ELEMENTS: usize = 1 << 30;

/// A named layout of `--layout`: name, rank, reduced axes (an entry of [`NAMED_LAYOUTS`]).
type NamedLayout = (&'static str, usize, &'static [usize]);

/// Splits `value` at `separator` and parses each item; the message names the bad item.
fn parse_list<T>(
    value: &str,
    separator: char,
    item: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<Vec<T>, String> {
    if value.trim().is_empty() {
        return Err(format!("needs a value ({expected})"));
    }
    value
        .split(separator)
        .map(|s| {
            let s = s.trim();
            item(s).ok_or_else(|| {
                let within =
                    if value.contains(separator) { format!(" (in `{value}`)") } else { String::new() };
                format!("`{s}` is not {expected}{within}")
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

fn parse_cases(value: &str) -> Result<Vec<Case>, String> {
    let mut cases = parse_list(
        value,
        ',',
        |s| STANDARD_SHAPES.iter().find(|c| c.name.eq_ignore_ascii_case(s)).map(Case::standard),
        "a standard shape S1..S6",
    )?;
    cases.dedup();
    Ok(cases)
}

fn parse_shape(value: &str) -> Result<Vec<usize>, String> {
    let shape = parse_list(value, 'x', parse_usize, "a positive integer extent")?;
    if shape.contains(&0) {
        return Err(format!("extents must be positive, got `{value}`"));
    }
    if shape.len() < 2 {
        return Err(format!("need at least 2 axes (reduced and feature), got `{value}`"));
    }
    let elements = shape.iter().try_fold(1usize, |acc, &e| acc.checked_mul(e));
    if elements.is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(format!("`{value}` has more than {MAX_ELEMENTS} elements"));
    }
    Ok(shape)
}

fn parse_axes(value: &str) -> Result<Vec<usize>, String> {
    parse_list(value, ',', parse_usize, "an axis index")
}

fn parse_layout(value: &str) -> Result<NamedLayout, String> {
    let lower = value.to_ascii_lowercase();
    NAMED_LAYOUTS
        .iter()
        .find(|(n, _, _)| *n == lower)
        .copied()
        .ok_or_else(|| format!("`{value}` is not one of nchw, nhwc, nc, ncl"))
}

fn parse_modes(value: &str) -> Result<Vec<Mode>, String> {
    let mut modes = parse_list(value, ',', Mode::from_name, "train, eval or backward")?;
    modes.sort();
    modes.dedup();
    Ok(modes)
}

fn parse_threads(value: &str) -> Result<usize, String> {
    match parse_usize(value) {
        Some(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("`{value}` is not a thread count from 1 to 4096")),
    }
}

fn parse_backend(value: &str) -> Result<String, String> {
    value
        .parse::<batchnorm::Backend>()
        .map(|b| b.name().to_string())
        .map_err(|_| format!("`{value}` is not one of {}", BACKEND_NAMES.join(", ")))
}

fn parse_dtype(value: &str) -> Result<Dtype, String> {
    Dtype::from_name(value).ok_or_else(|| format!("`{value}` is not one of f32, bf16, f16, f64"))
}

fn parse_json_path(value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err("needs a path".to_string());
    }
    Ok(PathBuf::from(value))
}

fn parse_svg_path(value: &str) -> Result<PathBuf, String> {
    if !value.to_ascii_lowercase().ends_with(".svg") || value.len() <= 4 {
        return Err(format!("the plot is an SVG file, give a path ending in .svg (got `{value}`)"));
    }
    Ok(PathBuf::from(value))
}

impl RunArgs {
    /// The options, after the checks that involve several arguments (clap has checked each
    /// value and which arguments go together).
    fn into_options(self) -> Result<Options, String> {
        let mut options = Options {
            modes: self.mode.unwrap_or_else(|| Mode::ALL.to_vec()),
            threads: self.threads,
            backend: self.backend,
            dtype: self.dtype.unwrap_or_default(),
            quick: self.quick,
            epilogues: self.epilogues,
            json: self.json,
            plot: self.plot,
            suite: self.suite,
            torch: self.torch,
            ..Options::default()
        };
        if let Some(cases) = self.case {
            options.cases = cases;
        }
        if let Some(suite) = self.suite {
            options.cases = suite.cases();
        }
        if let Some(shape) = self.shape {
            let rank = shape.len();
            let axes = match (self.axes, self.layout) {
                (Some(a), _) => a,
                (None, Some((name, layout_rank, a))) => {
                    if layout_rank != rank {
                        return Err(format!(
                            "--layout {name} is for rank {layout_rank}, but --shape has {rank} axes"
                        ));
                    }
                    a.to_vec()
                }
                (None, None) => match NAMED_LAYOUTS.iter().find(|(n, r, _)| *r == rank && *n != "nhwc") {
                    Some((_, _, a)) => a.to_vec(),
                    None => {
                        return Err(format!("--shape has rank {rank}: give its reduced axes with --axes"))
                    }
                },
            };
            let mut sorted = axes.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != axes.len() {
                return Err(format!("--axes: an axis is given twice in {axes:?}"));
            }
            if let Some(&a) = sorted.iter().find(|&&a| a >= rank) {
                return Err(format!("--axes: axis {a} is out of range for --shape of rank {rank}"));
            }
            let case = Case::new(shape, sorted);
            Layout::from_axes(&case.features(), &case.axes)
                .map_err(|e| format!("--shape {} with axes {:?}: {e}", case.shape_string(), case.axes))?;
            let trains = options.modes.iter().any(|&m| m != Mode::Eval);
            if trains && case.per_feature() < 2 {
                return Err(format!(
                    "--shape {} with axes {:?} has 1 value per feature; training (and its backward) needs \
                     at least 2 (use --mode eval)",
                    case.shape_string(),
                    case.axes
                ));
            }
            options.cases = vec![case];
        }
        let dtype = options.dtype;
        options.cases = options.cases.into_iter().map(|c| c.with_dtype(dtype)).collect();
        Ok(options)
    }
}

/// Parses the arguments (without the program name) into a command or clap's error (whose
/// kind is `DisplayHelp` for `-h` and `--help`).
fn parse<I, S>(args: I) -> Result<Command, clap::Error>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut command = Cli::command();
    let args = std::iter::once("bn-bench".to_string()).chain(args.into_iter().map(Into::into));
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    if let Some(SubCommand::Markdown(options)) = cli.command {
        return Ok(Command::Markdown(options));
    }
    cli.run
        .into_options()
        .map(Command::Run)
        .map_err(|message| command.error(ErrorKind::ValueValidation, message))
}

/// Parses the arguments (without the program name). `-h` and `--help` anywhere are
/// [`Command::Help`]; an error carries clap's message as it would be printed (without colour).
pub fn parse_args<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    match parse(args) {
        Ok(command) => Ok(command),
        Err(e) if e.kind() == ErrorKind::DisplayHelp => Ok(Command::Help),
        Err(e) => Err(UsageError(e.render().to_string())),
    }
}

/// The text of `--help` (without colour).
pub fn help() -> String {
    Cli::command().render_long_help().to_string()
}

/// Why a run failed (after the arguments were accepted).
#[derive(Debug)]
pub enum RunError {
    /// A layer returned an error.
    Layer(String),
    /// The Rayon pool could not be built.
    ThreadPool(String),
    /// Reading PyTorch's records or writing the JSON or the plot failed.
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
    // Read before measuring, so that a wrong path fails at once.
    let torch = match &options.torch {
        Some(path) => Some(
            report::read_json(path)
                .map_err(|e| RunError::Output(format!("cannot read {}: {e}", path.display())))?,
        ),
        None => None,
    };
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
                let with_naive = options.suite.is_none();
                let row = Workload::with_epilogues(case, mode, with_naive, options.epilogues)
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
    let rows = report::rows(&measurements, threads, &backend, &options.command_line());
    let mut table = report::table(&rows, &options.cases, threads, &backend);
    if let Some(note) = backend_note() {
        table = format!("note: {note}\n{table}");
    }
    if let Some(suite) = options.suite {
        table.push_str(&crate::suite::summary(suite, &rows, "runtime", torch.as_deref()));
        table.push('\n');
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
    match parse(args) {
        // Help goes to stdout with exit code 0, an argument error to stderr with 2.
        Err(e) => {
            let _ = e.print();
            e.exit_code()
        }
        Ok(Command::Help) => {
            print!("{}", help());
            0
        }
        Ok(Command::Markdown(options)) => match crate::markdown::run(&options) {
            Ok(table) => {
                print!("{table}");
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
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
