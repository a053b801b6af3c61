//! Declares the `fuzzing` cfg that `cargo fuzz` sets, so a plain build does not warn.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
