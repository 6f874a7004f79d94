//! What counting one request costs a worker: the recorder calls a request makes with `--metrics` on, in a
//! loop against a real shared-memory cell, timed over many iterations. The wall-clock benchmark
//! (bench/bench.py) cannot resolve a cost this small against its own noise; this bounds it from above.
//!
//! Run: `cargo run --release --example metrics_cost`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use oxwsgi::metrics::model::Method;
use oxwsgi::metrics::{Recorder, Region, RequestDone};

/// Requests per timed batch: long enough that the clock's resolution does not matter.
const REQUESTS: u32 = 5_000_000;
/// Batches; the fastest is reported (the others were slowed by whatever else the machine did).
const BATCHES: usize = 7;

fn main() -> std::io::Result<()> {
    let master = Region::create(1)?;
    let recorder = Recorder::new(Region::inherit(master.fd().try_clone_to_owned()?)?, 0)?;
    let with = fastest(|| one_request(recorder));
    let without = fastest(|| one_request(Recorder::disabled()));
    println!("per request: {with:.1} ns with a cell, {without:.1} ns without (the disabled checks)");
    println!("added by counting: {:.1} ns", with - without);
    Ok(())
}

/// What a request records, in order: connection in flight, the thread takes it, the thread is done,
/// the response is written (the durations themselves are measured by the server in any case).
fn one_request(recorder: Recorder) {
    let in_flight = recorder.in_flight();
    let started = Instant::now();
    recorder.app_started(0, black_box(Duration::from_micros(30)), black_box([b"GET", b"/users/42?page=1"]));
    recorder.app_finished(0, started.elapsed(), false);
    recorder.request_done(&RequestDone {
        method: Method::Get,
        status: 200,
        duration: black_box(Duration::from_micros(900)),
        body_bytes: 0,
        response_bytes: 120,
        write_failed: false,
    });
    drop(in_flight);
}

fn fastest(request: impl Fn()) -> f64 {
    (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..REQUESTS {
                request();
            }
            start.elapsed().as_secs_f64() * 1e9 / f64::from(REQUESTS)
        })
        .fold(f64::INFINITY, f64::min)
}
