//! The `retort` command-line tool.
fn main() {}
