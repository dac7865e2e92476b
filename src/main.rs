//! The `disendiff` command line; see `disendiff --help`.

fn main() {
    if let Err(e) = disendiff::cli::run() {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
