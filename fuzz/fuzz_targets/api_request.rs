//! Fuzz target `api_request`: see [`tenantry_fuzz::api_request`]. Under `cargo fuzz` this is a
//! libFuzzer target; built plainly it replays the files named on its command line.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tenantry_fuzz::api_request(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    tenantry_fuzz::replay_main(tenantry_fuzz::api_request)
}
