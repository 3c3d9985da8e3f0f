//! The `zebu` command line (being built).
fn main() {}
