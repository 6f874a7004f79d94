//! Build script: embeds an rpath to the directory holding `libpython`, so the `oxwsgi` binary (and the test
//! binaries that link it) start without `LD_LIBRARY_PATH`, whatever prefix the interpreter was installed in;
//! and records the Python version built against, for the master's build-info metric (the master never
//! starts Python).

fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    println!("cargo:rustc-env=OXWSGI_PYTHON_VERSION={}", pyo3_build_config::get().version());
}
