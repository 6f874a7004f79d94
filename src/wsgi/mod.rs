//! The WSGI side: the embedded interpreter, the app, and the pool of Python threads that runs it; and the
//! extension module the installed Python package runs the command through (`module`), where the
//! interpreter is the one that imported it.
//!
//! The only part of oxwsgi that imports pyo3. Its threads take [`Request`](crate::server::Request)s from
//! the server's [`Acceptor`](crate::server::Acceptor) and answer through its
//! [`Responder`](crate::server::Responder), releasing the interpreter around every system call; the socket
//! work itself is the server's. A `PyErr` never leaves this module: app failures are logged here, with
//! their traceback, and turned into a 500 or an aborted response.

mod environ;
mod harakiri;
mod module;
mod pool;
mod response;
mod streams;

use std::ffi::{CString, OsString};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyModule, PyString};

use crate::config::{AppSource, AppSpec, PoolConfig};
use crate::metrics::Recorder;
use crate::server::Front;

pub use pool::{Pool, StartError};

/// Python run once at start: loads the app, so that the errors users see are Python's own, with a
/// traceback, followed by one line saying what oxwsgi was trying to do.
const LOADER: &str = r#"
import importlib, importlib.util, os, sys

class AppNotFound(Exception):
    """The module loaded, but the app is not in it (no traceback worth showing)."""

def load_module(name):
    return importlib.import_module(name)

def load_file(path):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise AppNotFound(f"no such file: {path}")
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module

def use_virtualenv(venv):
    """Puts the virtualenv's site-packages (and its .pth entries) in front of the system's."""
    import site
    venv = os.path.abspath(venv)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    packages = os.path.join(venv, "lib", version, "site-packages")
    if not os.path.isdir(packages):
        raise AppNotFound(f"--virtualenv {venv}: no {packages} (is it a virtualenv made with {version}?)")
    before = list(sys.path)
    site.addsitedir(packages)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before
    sys.prefix = sys.exec_prefix = venv

def sync_environ(current):
    """Makes os.environ, a copy taken when Python started, the process's environment as it is now. An
    interpreter that ran before oxwsgi did (the installed command) would otherwise miss what oxwsgi changed
    since: the variables the master handed this worker, removed; --env, set."""
    current = dict(current)
    for key in [key for key in os.environ if key not in current]:
        del os.environ[key]
    for key, value in current.items():
        if os.environ.get(key) != value:
            os.environ[key] = value

def find_callable(module, name, where):
    try:
        app = getattr(module, name)
    except AttributeError:
        raise AppNotFound(f"{where} has no attribute {name!r}") from None
    if not callable(app):
        raise AppNotFound(f"{where}:{name} is not callable (it is a {type(app).__name__})")
    return app
"#;

/// A loaded app, ready to be handed to a [`Pool`].
pub struct App {
    callable: Py<PyAny>,
}

/// Why the app could not be loaded; the Python traceback, if any, was already printed.
#[derive(Debug)]
pub struct LoadError {
    app: String,
    cause: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot load WSGI app {}: {}", self.app, self.cause)
    }
}

impl std::error::Error for LoadError {}

/// Starts the interpreter and imports the app. Must run before any socket accepts, so that a broken app
/// fails loudly at start instead of answering 502s.
pub fn load(spec: &AppSpec) -> Result<App, LoadError> {
    let fail = |cause: String| LoadError { app: spec.to_string(), cause };
    if let Some(dir) = &spec.chdir {
        std::env::set_current_dir(dir).map_err(|e| fail(format!("--chdir {}: {e}", dir.display())))?;
    }
    Python::initialize();
    Python::attach(|py| {
        prepare_interpreter(py, spec).map_err(|e| fail(describe(py, &e)))?;
        let loader = PyModule::from_code(py, &cstring(LOADER), c"oxwsgi_loader.py", c"oxwsgi_loader")
            .map_err(|e| fail(describe(py, &e)))?;
        let environ: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let synced = loader.call_method1("sync_environ", (environ,)).map(drop);
        let venv = synced.and_then(|()| match &spec.virtualenv {
            Some(venv) => loader.call_method1("use_virtualenv", (venv,)).map(drop),
            None => Ok(()),
        });
        let loaded = venv
            .and_then(|()| match &spec.source {
                AppSource::Module(name) => loader.call_method1("load_module", (name,)),
                AppSource::File(path) => loader.call_method1("load_file", (path,)),
            })
            .and_then(|module| {
                let where_ = match &spec.source {
                    AppSource::Module(name) => format!("module {name}"),
                    AppSource::File(path) => path.display().to_string(),
                };
                loader.call_method1("find_callable", (module, &spec.callable, where_))
            });
        match loaded {
            Ok(app) => Ok(App { callable: app.unbind() }),
            Err(err) => {
                // Our own "not found" errors are a sentence, not a crash: no traceback, no exception name.
                let not_found = loader.getattr("AppNotFound").is_ok_and(|cls| err.is_instance(py, &cls));
                if not_found {
                    return Err(fail(err.value(py).to_string()));
                }
                err.print(py);
                Err(fail(describe(py, &err)))
            }
        }
    })
}

/// `sys.argv` (absent in an embedded interpreter, but read by many libraries), `sys.path`, and
/// line-buffered standard streams so app prints reach the log promptly.
fn prepare_interpreter(py: Python<'_>, spec: &AppSpec) -> PyResult<()> {
    let sys = py.import("sys")?;
    sys.setattr("argv", PyList::new(py, ["oxwsgi"])?)?;
    let path = sys.getattr("path")?.cast_into::<PyList>()?;
    let mut front: Vec<String> = spec.pythonpath.iter().map(|p| absolute(p)).collect();
    front.push(absolute(Path::new(".")));
    for dir in front.iter().rev() {
        if !path.contains(dir)? {
            path.insert(0, dir)?;
        }
    }
    for stream in ["stdout", "stderr"] {
        let stream = sys.getattr(stream)?;
        if !stream.is_none() {
            let kwargs = PyDict::new(py);
            kwargs.set_item("line_buffering", true)?;
            stream.call_method("reconfigure", (), Some(&kwargs))?;
        }
    }
    Ok(())
}

fn absolute(path: &Path) -> String {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

fn cstring(code: &str) -> CString {
    // The loader source is a constant without NUL bytes.
    CString::new(code).expect("loader source has no NUL byte")
}

/// `ExceptionType: message`, on one line.
fn describe(py: Python<'_>, err: &PyErr) -> String {
    let kind = err.get_type(py).name().map_or_else(|_| "Exception".to_owned(), |n| n.to_string());
    let message = err.value(py).str().map(|s| s.to_string()).unwrap_or_default();
    let line = if message.is_empty() { kind } else { format!("{kind}: {message}") };
    line.replace('\n', " ")
}

/// The full Python traceback of `err`, for the log.
fn traceback(py: Python<'_>, err: &PyErr) -> String {
    // Type, value and traceback passed apart: before Python 3.12 the value's __traceback__ is not yet set.
    let args = (err.get_type(py), err.value(py), err.traceback(py));
    let formatted = py.import("traceback").and_then(|tb| tb.call_method1("format_exception", args));
    match formatted.and_then(|lines| PyString::new(py, "").call_method1("join", (lines,))) {
        Ok(text) => text.to_string().trim_end().to_owned(),
        Err(_) => describe(py, err),
    }
}

/// Runs the app's `atexit` handlers (Sentry's flush, `logging.shutdown`, ...), as a normal interpreter exit
/// would; the embedded interpreter is never finalized, so nothing else runs them.
fn run_exit_hooks() {
    Python::attach(|py| {
        if let Err(err) = py.import("atexit").and_then(|atexit| atexit.call_method0("_run_exitfuncs")) {
            tracing::error!("atexit handler failed:\n{}", traceback(py, &err));
        }
    });
}

/// Starts the pool of Python threads that serve `app` from `front`.
/// `on_harakiri` is called (once) if a request outlives `--harakiri`.
pub fn start(
    app: App,
    config: PoolConfig,
    on_harakiri: Box<dyn FnOnce() + Send>,
    metrics: Recorder,
    front: &Arc<Front>,
) -> Result<Pool, StartError> {
    Pool::start(app, config, on_harakiri, metrics, front)
}
