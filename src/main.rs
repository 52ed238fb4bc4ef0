//! The `wafersim` command line. Parsing and error display live in [`wafersim::cli`].

fn main() -> std::process::ExitCode {
    restore_default_sigpipe();
    wafersim::cli::main()
}

/// Output piped into a program that stops reading (`wafersim step ... | head`) ends the process
/// quietly, as for other Unix tools, instead of `println!` panicking on the broken pipe: Rust
/// ignores SIGPIPE by default, this puts the default action back.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; resetting a signal
    // to its default action touches no memory of this program.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
