//! The extension module `oxwsgi._oxwsgi`, which the Python package (`pip install .`, see pyproject.toml)
//! runs the command through: `python/oxwsgi/__main__.py` hands it `sys.argv` and how to start workers.
//!
//! Here Python is already running and calls us on its main thread, so [`load`](super::load)'s
//! `Python::initialize` does nothing and the app is imported by this very interpreter, with its
//! virtualenv's packages. The command itself runs detached from the interpreter, exactly as in the
//! standalone binary ([`crate::cli`]).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use pyo3::prelude::*;

use crate::cli;
use crate::master::WorkerCommand;

#[pymodule]
mod _oxwsgi {
    #[pymodule_export]
    use super::run;
}

/// `run(argv, worker)`: runs the `oxwsgi` command with `argv` (the program name first) until it stops, and
/// returns its exit status. `worker` is the command a master starts its workers with (e.g.
/// `[sys.executable, "-m", "oxwsgi"]`); the master's arguments follow it. Call it on the main thread.
#[pyfunction]
fn run(py: Python<'_>, argv: Vec<OsString>, worker: Vec<OsString>) -> PyResult<u8> {
    let mut worker = worker.into_iter();
    let Some(interpreter) = worker.next() else {
        return Err(pyo3::exceptions::PyValueError::new_err("worker: an empty command"));
    };
    let leading: Vec<OsString> = worker.collect();
    let workers = WorkerCommand::interpreter(PathBuf::from(interpreter), &leading, &argv);
    give_sigint_back(py)?;
    let status = py.detach(|| {
        let status = cli::run_with(argv, workers);
        // Only clap writes to stdout (`--help`), and a binary's exit would flush it.
        let _ = std::io::stdout().flush();
        status
    });
    // The command exits with success or failure (1), nothing else.
    Ok(u8::from(status != ExitCode::SUCCESS))
}

/// Python's own SIGINT handler only sets a flag that its main thread acts on once it runs Python again; the
/// server's handler would chain to it, and after a graceful stop the interpreter would raise
/// `KeyboardInterrupt` in whatever Python code runs next (the app's `atexit` handlers). With the default
/// disposition back, the server's handler is the only one, as in the standalone binary (and until it is
/// installed, Ctrl-C stops the process at once, also as there).
fn give_sigint_back(py: Python<'_>) -> PyResult<()> {
    let signal = py.import("signal")?;
    signal.call_method1("signal", (signal.getattr("SIGINT")?, signal.getattr("SIG_DFL")?))?;
    Ok(())
}
