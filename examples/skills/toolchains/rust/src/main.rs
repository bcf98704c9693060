//! com.example.hello-rust: answers {"hello":INPUT}, its input (JSON text) wrapped in a JSON object.
//!
//! ABI wasi-command-v1: an ordinary program. The input is stdin, the output stdout, exit code 0 success;
//! stderr (eprintln!) is kept for `clawhub logs`. See docs/skills/rust.md.
use std::io::{self, Read, Write};
use std::process::exit;

fn main() {
    let mut input = Vec::new();
    if io::stdin().read_to_end(&mut input).is_err() {
        exit(2);
    }
    let mut out = io::stdout().lock();
    let written = out
        .write_all(b"{\"hello\":")
        .and_then(|_| out.write_all(&input))
        .and_then(|_| out.write_all(b"}"))
        .and_then(|_| out.flush());
    if written.is_err() {
        exit(1);
    }
}
