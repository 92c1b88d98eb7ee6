//! Verdicts checked over and over, each on its own thread, while something happens to
//! the agent (a restart, a reload): any wrong verdict at any moment fails the test.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Instant,
};

/// A verdict checked over and over while something happens to the agent.
pub struct Probe<'a> {
    pub name: &'static str,
    check: Box<dyn Fn() -> bool + Sync + 'a>,
}

pub fn probe<'a>(name: &'static str, check: impl Fn() -> bool + Sync + 'a) -> Probe<'a> {
    Probe {
        name,
        check: Box::new(check),
    }
}

/// Runs every probe in a loop on its own thread while `during` runs; returns what
/// `during` returned. Panics naming each probe that ever saw a wrong verdict, and if a
/// probe ran fewer than `min_rounds` times (a probe that never ran proves nothing).
pub fn under_traffic<R>(probes: &[Probe<'_>], min_rounds: usize, during: impl FnOnce() -> R) -> R {
    let stop = AtomicBool::new(false);
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let rounds: Vec<AtomicUsize> = probes.iter().map(|_| AtomicUsize::new(0)).collect();
    let started = Instant::now();
    let result = thread::scope(|scope| {
        for (probe, rounds) in probes.iter().zip(&rounds) {
            let (stop, failures) = (&stop, &failures);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !(probe.check)() {
                        failures.lock().unwrap().push(format!(
                            "{} failed at +{:?}",
                            probe.name,
                            started.elapsed()
                        ));
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Stops the probes even when `during` panics, so a failure never hangs.
        struct StopOnDrop<'s>(&'s AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        during()
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "wrong verdicts: {failures:#?}");
    for (probe, rounds) in probes.iter().zip(&rounds) {
        let n = rounds.load(Ordering::Relaxed);
        eprintln!("probe {:?}: {n} checks, all right", probe.name);
        assert!(
            n >= min_rounds,
            "probe {:?} ran only {n} times (wanted {min_rounds})",
            probe.name
        );
    }
    result
}
