//! `cargo run --release -p bn-bench -- --help`

fn main() {
    std::process::exit(bn_bench::cli::main_with_args(std::env::args().skip(1)));
}
