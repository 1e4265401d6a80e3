//! Argument parsing of the `bn-bench` command: what it accepts, and that everything else is a
//! clear message (clap's, with the usage) and exit code 2 (never a panic).

use std::path::PathBuf;

use bn_bench::case::{Case, Mode};
use bn_bench::cli::{parse_args, Command, Options, UsageError};

fn run_options(args: &[&str]) -> Options {
    match parse_args(args.iter().copied()) {
        Ok(Command::Run(o)) => o,
        other => panic!("{args:?} should parse as a run, got {other:?}"),
    }
}

fn usage_error(args: &[&str]) -> String {
    match parse_args(args.iter().copied()) {
        Err(UsageError(message)) => message,
        other => panic!("{args:?} should be an argument error, got {other:?}"),
    }
}

#[test]
fn no_arguments_run_every_standard_shape_and_mode() {
    let o = run_options(&[]);
    let names: Vec<&str> = o.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["S1", "S2", "S3", "S4", "S5", "S6"]);
    assert_eq!(o.modes, Mode::ALL);
    assert_eq!((o.threads, o.backend.as_deref(), o.quick), (None, None, false));
    assert_eq!((o.json.as_ref(), o.plot.as_ref()), (None, None));
    assert_eq!(o, Options::default());
}

#[test]
fn help() {
    assert_eq!(parse_args(["--help"]), Ok(Command::Help));
    assert_eq!(parse_args(["--quick", "-h"]), Ok(Command::Help));
    assert!(bn_bench::cli::help().contains("Examples:"));
}

#[test]
fn every_option() {
    let o = run_options(&[
        "--shape",
        "32x64x56x56",
        "--axes",
        "0,2,3",
        "--mode",
        "eval,train",
        "--threads",
        "3",
        "--backend",
        "AVX2",
        "--quick",
        "--json",
        "out.json",
        "--plot=out.svg",
    ]);
    assert_eq!(o.cases, vec![Case::new(vec![32, 64, 56, 56], vec![0, 2, 3])]);
    assert_eq!(o.cases[0].name, "S2", "a standard shape given with --shape keeps its name");
    assert_eq!(o.modes, [Mode::Train, Mode::Eval]);
    assert_eq!(o.threads, Some(3));
    assert_eq!(o.backend.as_deref(), Some("avx2"));
    assert!(o.quick);
    assert_eq!(o.json, Some(PathBuf::from("out.json")));
    assert_eq!(o.plot, Some(PathBuf::from("out.svg")));
}

#[test]
fn layouts_and_default_axes() {
    let axes = |args: &[&str]| run_options(args).cases[0].axes.clone();
    assert_eq!(axes(&["--shape", "32x56x56x64", "--layout", "nhwc"]), [0, 1, 2]);
    assert_eq!(axes(&["--shape", "32x64x56x56", "--layout", "NCHW"]), [0, 2, 3]);
    assert_eq!(axes(&["--shape", "64x128x1000", "--layout=ncl"]), [0, 2]);
    assert_eq!(axes(&["--shape", "256x1024", "--layout", "nc"]), [0]);
    // Without --axes or --layout the rank decides: nc, ncl, nchw.
    assert_eq!(axes(&["--shape", "256x1024"]), [0]);
    assert_eq!(axes(&["--shape", "4x8x10"]), [0, 2]);
    assert_eq!(axes(&["--shape", "4x8x3x3"]), [0, 2, 3]);
    // Several feature axes: the seed's own example.
    let o = run_options(&["--shape", "96x55x55", "--axes", "0"]);
    assert_eq!((o.cases[0].name.as_str(), o.cases[0].features()), ("custom", vec![55, 55]));
    assert_eq!(run_options(&["--shape", "1x64x8x8"]).cases[0].name, "S6");
}

#[test]
fn case_selection() {
    let o = run_options(&["--case", "s2,S3", "--mode", "backward"]);
    let names: Vec<&str> = o.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["S2", "S3"]);
    assert_eq!(o.modes, [Mode::Backward]);
}

#[test]
fn resnet50_suite() {
    let o = run_options(&["--suite", "resnet50", "--quick", "--torch", "torch.json"]);
    let names: Vec<&str> = o.cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8", "R9"]);
    assert_eq!(o.cases[0].shape, [50, 64, 112, 112]);
    assert!(o.cases.iter().all(|c| c.axes == [0, 2, 3]));
    assert_eq!(o.suite, Some(bn_bench::suite::Suite::Resnet50));
    assert_eq!(o.torch, Some(PathBuf::from("torch.json")));
    for (args, expected) in [
        (&["--suite", "resnet50", "--case", "S1"][..], "cannot be used with"),
        (&["--suite", "resnet50", "--shape", "4x8"], "cannot be used with"),
        (&["--suite", "resnet18"], "invalid value 'resnet18' for '--suite <NAME>'"),
        (&["--torch", "torch.json"], "the following required arguments were not provided:\n  --suite"),
    ] {
        let message = usage_error(args);
        assert!(message.contains(expected), "{args:?}: message `{message}` should contain `{expected}`");
    }
}

#[test]
fn markdown_subcommand() {
    use bn_bench::markdown::{LayerChoice, MarkdownOptions};
    let parsed = parse_args(["markdown", "--from", "ours.json", "--torch", "torch.json"]);
    let expected = MarkdownOptions {
        from: PathBuf::from("ours.json"),
        torch: Some(PathBuf::from("torch.json")),
        layer: LayerChoice::Macro,
    };
    assert_eq!(parsed, Ok(Command::Markdown(expected)));
    match parse_args(["markdown", "--from", "a.json", "--layer", "runtime"]) {
        Ok(Command::Markdown(o)) => assert_eq!((o.torch, o.layer), (None, LayerChoice::Runtime)),
        other => panic!("{other:?}"),
    }
    assert!(usage_error(&["markdown"]).contains("--from"));
    assert!(usage_error(&["--quick", "markdown", "--from", "a.json"]).contains("cannot be used with"));
    assert_eq!(bn_bench::cli::main_with_args(["markdown", "--from", "/no/such/file.json"]), 1);
}

#[test]
fn the_command_line_of_options_parses_back_to_them() {
    for args in [
        &[][..],
        &["--case", "S3,S1", "--mode", "eval", "--quick"],
        &["--shape", "96x55x55", "--axes", "0", "--threads", "2", "--backend", "wide"],
        &["--dtype", "bf16", "--epilogues", "--json", "my runs/out.json", "--plot", "it's.svg"],
        &["--suite", "resnet50", "--mode", "train,backward", "--torch", "torch.json"],
    ] {
        let options = run_options(args);
        let line = options.command_line();
        let words = shell_words(&line);
        assert_eq!(words[0], "bn-bench");
        assert_eq!(
            run_options(&words[1..].iter().map(String::as_str).collect::<Vec<_>>()),
            options,
            "{line}"
        );
    }
}

/// Splits a command line as a POSIX shell does for plain and single-quoted words and `\'`.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if !quoted => (word, started) = (word + &chars.next().unwrap().to_string(), true),
            '\'' => (quoted, started) = (!quoted, true),
            ' ' if !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            c => (word, started) = (word + &c.to_string(), true),
        }
    }
    if started {
        words.push(word);
    }
    words
}

#[test]
fn argument_errors_are_messages() {
    let cases: &[(&[&str], &str)] = &[
        (&["--frobnicate"], "unexpected argument '--frobnicate'"),
        (&["S1"], "unrecognized subcommand 'S1'"),
        (&["--shape"], "a value is required for '--shape"),
        (&["--shape", "32x0x5"], "extents must be positive"),
        (&["--shape", "32xax5"], "`a` is not a positive integer extent"),
        (&["--shape", "32x-1"], "is not a positive integer extent"),
        (&["--shape", "64"], "need at least 2 axes"),
        (&["--shape", "100000x100000x100000"], "more than"),
        (&["--shape", "99999999999999999999999x2"], "is not a positive integer extent"),
        (&["--shape", "2x3x4x5x6"], "give its reduced axes with --axes"),
        (&["--shape", "4x8x3x3", "--axes", "0,4"], "axis 4 is out of range for --shape of rank 4"),
        (&["--shape", "4x8x3x3", "--axes", "0,2,2"], "an axis is given twice"),
        (&["--shape", "4x8x3x3", "--axes", "0,1,2,3"], "--shape 4x8x3x3 with axes [0, 1, 2, 3]"),
        (&["--shape", "4x8x3x3", "--axes", "0,2"], "--shape 4x8x3x3 with axes [0, 2]"),
        (&["--shape", "4x8x3x3", "--axes", "1"], "--shape 4x8x3x3 with axes [1]"),
        (&["--shape", "4x8x3x3", "--axes", "0,2,x"], "`x` is not an axis index"),
        (&["--shape", "4x8x3x3", "--layout", "nc"], "--layout nc is for rank 2"),
        (&["--shape", "4x8x3x3", "--layout", "nwhc"], "not one of nchw, nhwc, nc, ncl"),
        (
            &["--shape", "4x8x3x3", "--layout", "nchw", "--axes", "0,2,3"],
            "'--layout <NAME>' cannot be used with '--axes <0,2,3>'",
        ),
        (&["--axes", "0,2,3"], "the following required arguments were not provided:\n  --shape"),
        (&["--shape", "1x8", "--mode", "train"], "1 value per feature"),
        (&["--case", "S7"], "`S7` is not a standard shape"),
        (&["--case", "S1", "--shape", "4x8"], "'--case <S1,S3>' cannot be used with '--shape"),
        (&["--mode", "inference"], "`inference` is not train, eval or backward"),
        (&["--mode", ""], "for '--mode <LIST>': needs a value"),
        (&["--threads", "0"], "not a thread count"),
        (&["--threads", "two"], "not a thread count"),
        (&["--backend", "neon"], "not one of scalar, wide, avx2, avx512"),
        (&["--plot", "out.png"], "ending in .svg"),
        (&["--json", ""], "for '--json <PATH>': needs a path"),
        (&["--quick", "--quick"], "the argument '--quick' cannot be used multiple times"),
        (&["--quick=yes"], "unexpected value 'yes' for '--quick'"),
        (&["--threads", "2", "--threads=3"], "the argument '--threads <N>' cannot be used multiple times"),
    ];
    for (args, expected) in cases {
        let message = usage_error(args);
        assert!(message.contains(expected), "{args:?}: message `{message}` should contain `{expected}`");
    }
    // An inference-only run accepts one value per feature.
    assert_eq!(run_options(&["--shape", "1x8", "--mode", "eval"]).cases[0].per_feature(), 1);
}

#[test]
fn argument_errors_exit_with_2() {
    assert_eq!(UsageError::EXIT_CODE, 2);
    assert_eq!(bn_bench::cli::main_with_args(["--threads", "0"]), 2);
    assert_eq!(bn_bench::cli::main_with_args(["--no-such-option"]), 2);
    assert_eq!(bn_bench::cli::main_with_args(["--help"]), 0);
}
