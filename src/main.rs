//! The `wafersim` command line. Parsing and error display live in [`wafersim::cli`].

fn main() -> std::process::ExitCode {
    wafersim::cli::main()
}
