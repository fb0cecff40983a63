//! The fault suite's short form (vmm_tests::fault_suite; `fault-suite` runs it for as
//! long as asked): 60 s of faults on the stock guest under emu, storms of 500 monitor
//! clients, nothing lost.

use std::time::Duration;

use vmm_tests::fault_suite::{run_suite, Options};

#[test]
fn faults_under_load_lose_nothing() {
    let opts = Options {
        duration: Duration::from_secs(60),
        seed: 0x5eed_fa17,
        storm_clients: 500,
    };
    let tally = run_suite(&opts).unwrap_or_else(|why| panic!("{why}"));
    eprintln!("{tally:#?}");
    assert!(tally.faults.values().sum::<u64>() >= 6, "{tally:?}");
    assert!(
        tally.blocks_verified > 0 && tally.transfer_bytes > 0,
        "{tally:?}"
    );
}
