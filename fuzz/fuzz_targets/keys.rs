//! Fuzz target `keys`: see [`tenantry_fuzz::keys`]. Under `cargo fuzz` this is a
//! libFuzzer target; built plainly it replays the files named on its command line.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tenantry_fuzz::keys(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    tenantry_fuzz::replay_main(tenantry_fuzz::keys)
}
