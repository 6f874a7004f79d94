//! Command-line options and their validation into typed config.
//!
//! Owns the `Cli` (clap, uWSGI-familiar option names, `OXWSGI_*` environment fallbacks) and turns it, once,
//! into [`Config`]: small typed structs that travel by value to the parts that need them. Nothing here binds
//! sockets or touches Python.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use oxwsgi_proto::Limits;
use serde::{Deserialize, Serialize};

pub mod ini;
pub mod owner;

use owner::Owner;

/// nginx refuses to send a vars block over 65535 bytes (the u16 `datasize`), so accepting anything smaller by
/// default only turns long cookies into 502s (uWSGI's 4096 default is the classic cause).
pub const DEFAULT_BUFFER_SIZE: u32 = 65535;
/// uWSGI's default per-wait socket timeout; users switching expect the same failure timing.
pub const DEFAULT_SOCKET_TIMEOUT_SECS: u64 = 4;
/// gunicorn's default backlog; uWSGI's 100 fills up under bursts (unbit/uwsgi#1804).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;
/// gunicorn's default: long enough for ordinary requests to finish, short enough for a deploy.
pub const DEFAULT_GRACEFUL_TIMEOUT_SECS: u64 = 30;
/// uWSGI's mode for a bare `--chmod-socket`.
const DEFAULT_CHMOD_SOCKET: &str = "666";

/// Runs a Python WSGI application behind nginx over the uwsgi protocol (`uwsgi_pass`).
#[derive(Debug, Parser)]
#[command(name = "oxwsgi", version, about, long_about = None)]
#[allow(clippy::struct_excessive_bools)] // one field per command-line flag, as clap wants
pub struct Cli {
    /// Read options from a uWSGI ini file: its `[uwsgi]` section, with uWSGI's option names, and its
    /// `[oxwsgi]` section, which wins over `[uwsgi]`. The command line wins over the `OXWSGI_*`
    /// environment, which wins over the file; a repeatable option given there (`--socket`, `--env`, …)
    /// replaces the file's list. Options oxwsgi does not know are listed in one warning at start.
    #[arg(long, value_name = "FILE", env = "OXWSGI_INI")]
    pub ini: Option<PathBuf>,

    /// The same as `--ini FILE.ini`.
    #[arg(value_name = "FILE.ini", value_parser = ini::parse_positional, conflicts_with = "ini")]
    pub ini_file: Option<PathBuf>,

    /// Listen on ADDR: `host:port`, `[::1]:port`, `:port` (all IPv4 interfaces), or a Unix socket path
    /// (containing `/`, or prefixed `unix:`). Repeatable. Not needed under systemd socket activation. The
    /// uwsgi protocol has no authentication: a TCP address other hosts can reach is warned about at start.
    #[arg(long = "socket", short = 's', value_name = "ADDR", env = "OXWSGI_SOCKET", value_delimiter = ',')]
    pub sockets: Vec<String>,

    /// Also serve plain HTTP/1.1 on ADDR (the same forms as --socket; repeatable): for development without
    /// nginx, and for health probes (a Kubernetes `httpGet`). Keep-alive, Content-Length and chunked request
    /// bodies; the app sees the environ nginx would send for the same request. Public traffic still belongs
    /// behind nginx (TLS, static files, slow clients).
    #[arg(long = "http-socket", value_name = "ADDR", env = "OXWSGI_HTTP_SOCKET", value_delimiter = ',')]
    pub http_sockets: Vec<String>,

    /// Serve uwsgi over TLS on a TCP ADDR, as uWSGI's `suwsgi-socket` (`uwsgi_pass suwsgi://` in nginx):
    /// `ADDR,CERT,KEY[,CA]`, PEM files of the certificate chain, its key and, with CA, the authority a client
    /// certificate must chain to — mutual TLS: a peer without one (anyone but your nginx) is refused at the
    /// handshake. Repeatable. Each worker reads the files when it starts, so a SIGHUP reload picks up renewed
    /// certificates.
    #[arg(long = "ssl-socket", value_name = "ADDR,CERT,KEY[,CA]", env = "OXWSGI_SSL_SOCKET")]
    pub ssl_sockets: Vec<String>,

    /// Load the app from a module: `package.module:callable` (callable defaults to --callable).
    #[arg(long, short = 'w', value_name = "MODULE[:CALLABLE]", env = "OXWSGI_MODULE")]
    #[arg(conflicts_with = "wsgi_file", required_unless_present_any = ["wsgi_file", "ini", "ini_file"])]
    pub module: Option<String>,

    /// Load the app from a Python file.
    #[arg(long = "wsgi-file", value_name = "PATH", env = "OXWSGI_WSGI_FILE")]
    pub wsgi_file: Option<PathBuf>,

    /// Name of the WSGI callable in the module or file.
    #[arg(long, value_name = "NAME", default_value = "application", env = "OXWSGI_CALLABLE")]
    pub callable: String,

    /// Change to DIR before loading the app (it is also put on `sys.path`).
    #[arg(long, value_name = "DIR", env = "OXWSGI_CHDIR")]
    pub chdir: Option<PathBuf>,

    /// Add DIR to the front of `sys.path`. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub pythonpath: Vec<PathBuf>,

    /// Use the packages of the virtualenv in DIR (made with the same Python version oxwsgi embeds).
    #[arg(long, short = 'H', visible_aliases = ["home", "venv"], value_name = "DIR", env = "OXWSGI_VIRTUALENV")]
    pub virtualenv: Option<PathBuf>,

    /// Python threads serving requests in each worker process.
    #[arg(long, value_name = "N", default_value = "1", env = "OXWSGI_THREADS")]
    pub threads: NonZeroUsize,

    /// Worker processes. With more than one (or with --master), a master process binds the sockets once,
    /// starts the workers and replaces any that dies.
    #[arg(
        long,
        short = 'p',
        visible_alias = "workers",
        value_name = "N",
        default_value = "1",
        env = "OXWSGI_PROCESSES"
    )]
    pub processes: NonZeroUsize,

    /// Run a master process even with one worker (it respawns the worker if it dies).
    #[arg(long, short = 'M')]
    pub master: bool,

    /// Replace a worker after it accepted N requests (implies --master). Guards against slow leaks.
    #[arg(long = "max-requests", value_name = "N", default_value_t = 0)]
    pub max_requests: u64,

    /// Add 0..=N (different per worker) to --max-requests, so workers do not all recycle at once.
    #[arg(long = "max-requests-jitter", alias = "max-requests-delta", value_name = "N", default_value_t = 0)]
    pub max_requests_jitter: u64,

    /// Replace a worker whose resident memory exceeds MB megabytes (implies --master).
    #[arg(long = "reload-on-rss", value_name = "MB", default_value_t = 0)]
    pub reload_on_rss: u64,

    /// A request running longer than SECS seconds: log where it is stuck and replace its worker, killing
    /// the worker's other requests too (implies --master).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub harakiri: u64,

    /// Replace a worker after it has run SECS seconds (implies --master).
    #[arg(long = "max-worker-lifetime", value_name = "SECS", default_value_t = 0)]
    pub max_worker_lifetime: u64,

    /// Seconds a graceful stop (SIGTERM, SIGINT) waits for in-flight requests before giving up on them.
    #[arg(long = "graceful-timeout", value_name = "SECS", default_value_t = DEFAULT_GRACEFUL_TIMEOUT_SECS)]
    pub graceful_timeout: u64,

    /// chmod Unix sockets after binding: an octal MODE such as 660 (a bare flag means 666).
    #[arg(long = "chmod-socket", value_name = "MODE", num_args = 0..=1, default_missing_value = DEFAULT_CHMOD_SOCKET)]
    pub chmod_socket: Option<String>,

    /// chown Unix sockets after binding to USER[:GROUP] (names or numbers), e.g. `www-data:www-data`.
    #[arg(long = "chown-socket", value_name = "USER[:GROUP]")]
    pub chown_socket: Option<String>,

    /// Run as this user (name or number) once the sockets are bound; the app never runs as root.
    #[arg(long, value_name = "USER")]
    pub uid: Option<String>,

    /// Run as this group (name or number) once the sockets are bound.
    #[arg(long, value_name = "GROUP")]
    pub gid: Option<String>,

    /// Write the pid of the master (or of the single process) to FILE; removed at exit.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Largest uwsgi vars block (request headers and params) accepted, in bytes; at most 65535.
    #[arg(long = "buffer-size", value_name = "BYTES", default_value_t = DEFAULT_BUFFER_SIZE)]
    pub buffer_size: u32,

    /// Largest request body (`CONTENT_LENGTH`) accepted, in bytes; larger gets 413. 0 means no limit.
    #[arg(long = "limit-post", value_name = "BYTES", default_value_t = 0)]
    pub limit_post: u64,

    /// Seconds to wait for each read of the request or write of the response before giving up.
    #[arg(long = "socket-timeout", value_name = "SECS", default_value_t = DEFAULT_SOCKET_TIMEOUT_SECS)]
    pub socket_timeout: u64,

    /// Backlog of each listening socket (connections waiting for a free thread).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LISTEN_BACKLOG)]
    pub listen: u32,

    /// Remove Unix socket files at exit (the default; accepted for uWSGI familiarity).
    #[arg(long, overrides_with = "no_vacuum")]
    pub vacuum: bool,

    /// Leave Unix socket files behind at exit.
    #[arg(long = "no-vacuum")]
    pub no_vacuum: bool,

    /// Do not log a line per request.
    #[arg(long = "disable-logging")]
    pub disable_logging: bool,

    /// Serve Prometheus metrics at `http://ADDR/metrics` from the master (`host:port` or `:port`), summed
    /// over all workers (implies --master).
    #[arg(long, value_name = "ADDR", env = "OXWSGI_METRICS")]
    pub metrics: Option<String>,

    /// Serve uWSGI-compatible stats JSON on ADDR (`host:port`, `:port` or a Unix socket path), for uwsgitop
    /// and the uWSGI exporters: each connection gets one document (implies --master).
    #[arg(long, value_name = "ADDR", env = "OXWSGI_STATS")]
    pub stats: Option<String>,

    /// Precede the --stats document with an HTTP/1.0 head, so browsers and curl can read it.
    #[arg(long = "stats-http", requires = "stats")]
    pub stats_http: bool,

    /// Reload the workers with zero downtime (as SIGHUP does) when FILE's modification time changes, or
    /// when FILE appears; checked every second. Repeatable (implies --master: the master does the reload).
    #[arg(long = "touch-reload", value_name = "FILE")]
    pub touch_reload: Vec<PathBuf>,

    /// Set KEY=VALUE in the environment before the app is imported (the workers inherit it). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Log lines as `text` (for people) or `json` (one object a line, for log shippers; the access log then
    /// has one field per value).
    #[arg(long = "log-format", value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text, env = "OXWSGI_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Write the log (everything otherwise on stderr) to FILE, appended (created with mode 640). SIGUSR1
    /// makes the master and every worker reopen it, for logrotate without copytruncate.
    #[arg(long, value_name = "FILE", env = "OXWSGI_LOGTO")]
    pub logto: Option<PathBuf>,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, as people read it.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where and how the log is written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `--logto`: a file instead of stderr.
    pub file: Option<PathBuf>,
}

/// Everything the process needs, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub sockets: Vec<SocketSpec>,
    /// `--http-socket`: plain HTTP/1.1 listeners.
    pub http_sockets: Vec<SocketSpec>,
    /// `--ssl-socket`: uwsgi over TLS.
    pub ssl_sockets: Vec<SocketSpec>,
    /// The certificate files of each TLS listener, in the order of `ssl_sockets`.
    pub tls: Vec<TlsFiles>,
    pub app: AppSpec,
    pub pool: PoolConfig,
    pub server: ServerConfig,
    pub processes: ProcessConfig,
    /// Who the process runs as once the sockets are bound.
    pub run_as: Owner,
    pub pidfile: Option<PathBuf>,
    pub metrics: MetricsConfig,
    /// Files whose modification reloads the workers (`--touch-reload`).
    pub touch_reload: Vec<PathBuf>,
    /// Set in the environment before the app is imported (`--env`), in order.
    pub env: Vec<(String, String)>,
    pub log: LogConfig,
}

/// Where the master serves what the workers count (each `None` is off; with both off workers count nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsConfig {
    /// Prometheus `/metrics` over HTTP.
    pub prometheus: Option<SocketAddr>,
    /// uWSGI stats JSON.
    pub stats: Option<SocketSpec>,
    pub stats_http: bool,
}

impl MetricsConfig {
    pub fn enabled(&self) -> bool {
        self.prometheus.is_some() || self.stats.is_some()
    }
}

/// How many processes, whether a master supervises them, and when it replaces them.
#[derive(Debug, Clone, PartialEq, Eq, Copy, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub workers: NonZeroUsize,
    pub master: bool,
    pub recycle: RecycleConfig,
}

/// When a worker is retired and replaced (each `None` is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecycleConfig {
    pub max_requests: Option<NonZeroU64>,
    pub max_requests_jitter: u64,
    /// Resident memory limit, in bytes.
    pub reload_on_rss: Option<u64>,
    pub max_worker_lifetime: Option<Duration>,
}

impl RecycleConfig {
    fn any(&self) -> bool {
        *self != Self { max_requests_jitter: self.max_requests_jitter, ..Self::default() }
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketSpec {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Which Python object to serve, and how to make it importable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub source: AppSource,
    pub callable: String,
    pub chdir: Option<PathBuf>,
    pub pythonpath: Vec<PathBuf>,
    pub virtualenv: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppSource {
    Module(String),
    File(PathBuf),
}

impl fmt::Display for AppSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            AppSource::Module(module) => write!(f, "{module}:{}", self.callable),
            AppSource::File(path) => write!(f, "{}:{}", path.display(), self.callable),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Copy, Serialize, Deserialize)]
pub struct PoolConfig {
    pub threads: NonZeroUsize,
    /// A request running longer has its worker replaced.
    pub harakiri: Option<Duration>,
    /// Other processes serve the same app (`wsgi.multiprocess`).
    pub multiprocess: bool,
}

/// [`Limits`] as the master hands it to its workers (the protocol crate knows nothing of serde).
#[derive(Serialize, Deserialize)]
#[serde(remote = "Limits")]
struct LimitsDef {
    max_datasize: u16,
    max_vars: usize,
}

/// What the connection handling needs.
#[derive(Debug, Clone, PartialEq, Eq, Copy, Serialize, Deserialize)]
pub struct ServerConfig {
    #[serde(with = "LimitsDef")]
    pub limits: Limits,
    /// Largest accepted `CONTENT_LENGTH`; `None` means unlimited.
    pub limit_post: Option<u64>,
    pub socket_timeout: Duration,
    pub listen_backlog: u32,
    /// Mode for Unix sockets after bind.
    pub chmod_socket: Option<u32>,
    /// Owner for Unix sockets after bind.
    pub chown_socket: Option<Owner>,
    pub access_log: bool,
    pub access_log_format: LogFormat,
    /// This process's `OXWSGI_WORKER_ID` (a worker of a master), for the access log.
    pub worker_id: Option<usize>,
    pub graceful_timeout: Duration,
    /// Remove Unix socket files at exit. Only the process that bound them does.
    pub vacuum: bool,
    /// After accepting this many connections the process asks to be replaced (a worker, with jitter applied).
    pub max_requests: Option<u64>,
}

/// What one TLS listener presents and checks: PEM files, read by each process that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// The certificate chain, the server's own first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, a client must present a certificate that chains to one of these (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A config that cannot be used, by kind; `Display` is the one line printed before exiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--buffer-size {0} is over 65535, the largest vars block the uwsgi protocol can carry")]
    BufferSizeTooLarge(u32),
    #[error("--buffer-size must be at least 1")]
    BufferSizeZero,
    #[error("--socket-timeout must be at least 1 second")]
    SocketTimeoutZero,
    #[error("--listen {0} is not a usable backlog")]
    Backlog(u32),
    /// A socket address (`--socket`, `--stats`, `--metrics`) that is neither `host:port` nor a path.
    #[error("{option} {value}: expected host:port, [ipv6]:port, :port or a Unix socket path")]
    Address { option: &'static str, value: String },
    #[error("--metrics {0}: Prometheus scrapes over TCP: give host:port")]
    MetricsNotTcp(String),
    #[error(
        "--ssl-socket {0}: expected ADDR,CERT,KEY[,CA] with a TCP ADDR (host:port, [ipv6]:port or :port)"
    )]
    SslSocket(String),
    #[error("--chmod-socket {0}: expected an octal mode such as 660")]
    Mode(String),
    /// A user or group that does not resolve (`--uid`, `--gid`, `--chown-socket`).
    #[error("{option}{}: {source}", value.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
    Owner { option: &'static str, value: Option<String>, source: owner::LookupError },
    #[error("--module {0} needs MODULE[:CALLABLE]")]
    Module(String),
    #[error("give exactly one of --module or --wsgi-file")]
    AppSource,
    #[error("--env {0}: expected KEY=VALUE with a non-empty KEY")]
    Env(String),
}

impl ConfigError {
    /// The option whose value is refused (`--buffer-size`), so that a value from an ini file can be
    /// reported at its line.
    pub fn option(&self) -> Option<&'static str> {
        match self {
            Self::BufferSizeTooLarge(_) | Self::BufferSizeZero => Some("--buffer-size"),
            Self::SocketTimeoutZero => Some("--socket-timeout"),
            Self::Backlog(_) => Some("--listen"),
            Self::Address { option, .. } | Self::Owner { option, .. } => Some(option),
            Self::MetricsNotTcp(_) => Some("--metrics"),
            Self::Mode(_) => Some("--chmod-socket"),
            Self::SslSocket(_) => Some("--ssl-socket"),
            Self::Module(_) => Some("--module"),
            Self::Env(_) => Some("--env"),
            Self::AppSource => None,
        }
    }
}

impl TryFrom<Cli> for Config {
    type Error = ConfigError;

    fn try_from(cli: Cli) -> Result<Self, ConfigError> {
        let sockets = cli.sockets.iter().map(|s| parse_socket(s)).collect::<Result<Vec<_>, _>>()?;
        let http_sockets = cli.http_sockets.iter().map(|s| parse_http_socket(s)).collect::<Result<_, _>>()?;
        let (ssl_sockets, tls): (Vec<_>, Vec<_>) = cli
            .ssl_sockets
            .iter()
            .map(|s| parse_ssl_socket(s))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let max_datasize =
            u16::try_from(cli.buffer_size).map_err(|_| ConfigError::BufferSizeTooLarge(cli.buffer_size))?;
        if max_datasize == 0 {
            return Err(ConfigError::BufferSizeZero);
        }
        if cli.socket_timeout == 0 {
            return Err(ConfigError::SocketTimeoutZero);
        }
        if cli.listen == 0 || i32::try_from(cli.listen).is_err() {
            return Err(ConfigError::Backlog(cli.listen));
        }
        let chmod_socket = cli.chmod_socket.as_deref().map(parse_mode).transpose()?;
        let chown_socket = cli
            .chown_socket
            .as_deref()
            .map(|owner| {
                owner::parse_owner(owner).map_err(|source| ConfigError::Owner {
                    option: "--chown-socket",
                    value: Some(owner.to_owned()),
                    source,
                })
            })
            .transpose()?;
        let run_as = Owner {
            uid: cli
                .uid
                .as_deref()
                .map(owner::resolve_user)
                .transpose()
                .map_err(|source| ConfigError::Owner { option: "--uid", value: None, source })?,
            gid: cli
                .gid
                .as_deref()
                .map(owner::resolve_group)
                .transpose()
                .map_err(|source| ConfigError::Owner { option: "--gid", value: None, source })?,
        };
        let recycle = RecycleConfig {
            max_requests: NonZeroU64::new(cli.max_requests),
            max_requests_jitter: cli.max_requests_jitter,
            reload_on_rss: (cli.reload_on_rss > 0).then(|| cli.reload_on_rss.saturating_mul(1024 * 1024)),
            max_worker_lifetime: (cli.max_worker_lifetime > 0)
                .then(|| Duration::from_secs(cli.max_worker_lifetime)),
        };
        let metrics = metrics_config(&cli)?;
        let env = cli.env.iter().map(|pair| parse_env(pair)).collect::<Result<Vec<_>, _>>()?;
        // Options only a master can serve (--touch-reload: a reload starts the new workers first).
        let needs_master =
            recycle.any() || cli.harakiri > 0 || metrics.enabled() || !cli.touch_reload.is_empty();
        let master = cli.master || cli.processes.get() > 1 || needs_master;
        let (source, callable) = app_source(cli.module, cli.wsgi_file, cli.callable)?;
        Ok(Config {
            sockets,
            http_sockets,
            ssl_sockets,
            tls,
            run_as,
            metrics,
            pidfile: cli.pidfile,
            touch_reload: cli.touch_reload,
            env,
            log: LogConfig { format: cli.log_format, file: cli.logto },
            app: AppSpec {
                source,
                callable,
                chdir: cli.chdir,
                pythonpath: cli.pythonpath,
                virtualenv: cli.virtualenv,
            },
            pool: PoolConfig {
                threads: cli.threads,
                harakiri: (cli.harakiri > 0).then(|| Duration::from_secs(cli.harakiri)),
                multiprocess: cli.processes.get() > 1,
            },
            processes: ProcessConfig { workers: cli.processes, master, recycle },
            server: ServerConfig {
                limits: Limits { max_datasize, ..Limits::default() },
                limit_post: (cli.limit_post > 0).then_some(cli.limit_post),
                socket_timeout: Duration::from_secs(cli.socket_timeout),
                listen_backlog: cli.listen,
                chmod_socket,
                chown_socket,
                access_log: !cli.disable_logging,
                access_log_format: cli.log_format,
                worker_id: None,
                graceful_timeout: Duration::from_secs(cli.graceful_timeout),
                vacuum: !cli.no_vacuum,
                max_requests: None,
            },
        })
    }
}

/// `--metrics`, `--stats` and `--stats-http`.
fn metrics_config(cli: &Cli) -> Result<MetricsConfig, ConfigError> {
    Ok(MetricsConfig {
        prometheus: cli
            .metrics
            .as_deref()
            .map(|addr| match parse_address("--metrics", addr)? {
                SocketSpec::Tcp(addr) => Ok(addr),
                SocketSpec::Unix(_) => Err(ConfigError::MetricsNotTcp(addr.to_owned())),
            })
            .transpose()?,
        stats: cli.stats.as_deref().map(|addr| parse_address("--stats", addr)).transpose()?,
        stats_http: cli.stats_http,
    })
}

/// `unix:/path` or anything with a `/` is a Unix socket; `:port` means every IPv4 interface (as in uWSGI);
/// otherwise `host:port`, resolved once, now.
pub fn parse_socket(text: &str) -> Result<SocketSpec, ConfigError> {
    parse_address("--socket", text)
}

/// Where the app comes from (`--module` or `--wsgi-file`), and its callable.
fn app_source(
    module: Option<String>,
    wsgi_file: Option<PathBuf>,
    callable: String,
) -> Result<(AppSource, String), ConfigError> {
    match (module, wsgi_file) {
        (Some(module), None) => {
            let (module, callable) = match module.split_once(':') {
                Some((module, callable)) => (module.to_owned(), callable.to_owned()),
                None => (module, callable),
            };
            if module.is_empty() || callable.is_empty() {
                return Err(ConfigError::Module(format!("{module}:{callable}")));
            }
            Ok((AppSource::Module(module), callable))
        }
        (None, Some(path)) => Ok((AppSource::File(path), callable)),
        _ => Err(ConfigError::AppSource),
    }
}

/// `ADDR,CERT,KEY[,CA]` of `--ssl-socket`, or uWSGI's `suwsgi-socket` form `ADDR,CERT,KEY,CIPHERS,CA`, with
/// a TCP address: TLS to a Unix socket would protect nothing a file mode does not.
pub fn parse_ssl_socket(text: &str) -> Result<(SocketSpec, TlsFiles), ConfigError> {
    let bad = || ConfigError::SslSocket(text.to_owned());
    let parts: Vec<&str> = text.split(',').collect();
    let (addr, cert, key, client_ca) = match parts[..] {
        [addr, cert, key] => (addr, cert, key, None),
        [addr, cert, key, ca] => (addr, cert, key, Some(ca)),
        // uWSGI's own order puts a cipher list before the CA: rustls offers only its safe suites, so the
        // list means nothing here (an empty CA, as uWSGI allows, means none).
        [addr, cert, key, _ciphers, ca] => (addr, cert, key, Some(ca).filter(|ca| !ca.is_empty())),
        _ => return Err(bad()),
    };
    if [addr, cert, key].iter().chain(client_ca.iter()).any(|part| part.is_empty()) {
        return Err(bad());
    }
    let spec = parse_address("--ssl-socket", addr)?;
    if !matches!(spec, SocketSpec::Tcp(_)) {
        return Err(bad());
    }
    // uWSGI's `!` before the CA makes the client certificate mandatory; here it always is.
    let client_ca = client_ca.map(|ca| PathBuf::from(ca.strip_prefix('!').unwrap_or(ca)));
    let files = TlsFiles { cert: cert.into(), key: key.into(), client_ca };
    Ok((spec, files))
}

/// [`parse_socket`] for `--http-socket`.
pub fn parse_http_socket(text: &str) -> Result<SocketSpec, ConfigError> {
    parse_address("--http-socket", text)
}

/// [`parse_socket`] for `option`, which its errors name.
fn parse_address(option: &'static str, text: &str) -> Result<SocketSpec, ConfigError> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(SocketSpec::Unix(PathBuf::from(path)));
    }
    if text.contains('/') {
        return Ok(SocketSpec::Unix(PathBuf::from(text)));
    }
    let with_host = if text.starts_with(':') { format!("0.0.0.0{text}") } else { text.to_owned() };
    if let Ok(addr) = with_host.parse::<SocketAddr>() {
        return Ok(SocketSpec::Tcp(addr));
    }
    let bad = || ConfigError::Address { option, value: text.to_owned() };
    if !with_host.contains(':') {
        return Err(bad());
    }
    with_host.to_socket_addrs().map_err(|_| bad())?.next().map(SocketSpec::Tcp).ok_or_else(bad)
}

/// `KEY=VALUE`, split at the first `=` (a value may hold more). The key must be one `setenv` takes: not
/// empty, no `=` (ruled out by the split) and no NUL (nor the value).
fn parse_env(text: &str) -> Result<(String, String), ConfigError> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !text.contains('\0') => {
            Ok((key.to_owned(), value.to_owned()))
        }
        _ => Err(ConfigError::Env(text.to_owned())),
    }
}

fn parse_mode(text: &str) -> Result<u32, ConfigError> {
    let valid = (1..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    if !valid {
        return Err(ConfigError::Mode(text.to_owned()));
    }
    u32::from_str_radix(text, 8).map_err(|_| ConfigError::Mode(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["oxwsgi"];
        argv.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(argv).expect("arguments parse"))
    }

    #[test]
    fn errors_have_kinds_and_one_line() {
        let owner = config(&["--socket", ":1", "--module", "m", "--chown-socket", "no-such-user-here"]);
        assert!(
            matches!(&owner, Err(ConfigError::Owner { option: "--chown-socket", value: Some(_), .. })),
            "{owner:?}"
        );
        let text = owner.unwrap_err().to_string();
        assert!(text.starts_with("--chown-socket no-such-user-here: no such user"), "{text}");
        assert_eq!(
            config(&["--socket", ":1", "--module", ":app"]).unwrap_err(),
            ConfigError::Module(":app".into())
        );
        let metrics = config(&["--socket", ":1", "--module", "m", "--metrics", "/tmp/m.sock"]).unwrap_err();
        assert_eq!(metrics, ConfigError::MetricsNotTcp("/tmp/m.sock".into()));
        assert_eq!(metrics.to_string(), "--metrics /tmp/m.sock: Prometheus scrapes over TCP: give host:port");
    }

    #[test]
    fn a_config_reaches_the_workers_whole() {
        let given = config(&[
            "--socket",
            "127.0.0.1:3031",
            "--socket",
            "/tmp/a.sock",
            "--module",
            "app:make()",
            "--chdir",
            "/srv",
            "--pythonpath",
            "/srv/lib",
            "--virtualenv",
            "/srv/venv",
            "--processes",
            "3",
            "--threads",
            "4",
            "--harakiri",
            "30",
            "--max-requests",
            "1000",
            "--max-requests-delta",
            "50",
            "--reload-on-rss",
            "512",
            "--max-worker-lifetime",
            "3600",
            "--buffer-size",
            "32768",
            "--limit-post",
            "1048576",
            "--socket-timeout",
            "7",
            "--listen",
            "256",
            "--chmod-socket",
            "660",
            "--disable-logging",
            "--pidfile",
            "/tmp/o.pid",
            "--metrics",
            "127.0.0.1:9100",
            "--stats",
            "/tmp/stats.sock",
            "--stats-http",
            "--touch-reload",
            "/srv/reload",
            "--env",
            "DJANGO_SETTINGS_MODULE=site.settings",
            "--log-format",
            "json",
            "--logto",
            "/var/log/app.log",
        ])
        .unwrap();
        let json = serde_json::to_string(&given).unwrap();
        let taken: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(taken, given);
    }

    #[test]
    fn operating_options() {
        let cfg = config(&["--socket", ":1", "--module", "m", "--env", "A=b=c", "--env", "EMPTY="]).unwrap();
        assert_eq!(cfg.env, [("A".into(), "b=c".into()), ("EMPTY".into(), String::new())]);
        assert_eq!(cfg.log, LogConfig::default());
        for bad in ["NOEQUALS", "=v"] {
            let err = config(&["--socket", ":1", "--module", "m", "--env", bad]).unwrap_err();
            assert_eq!(err, ConfigError::Env(bad.into()));
        }
        let cfg = config(&["--socket", ":1", "--module", "m", "--touch-reload", "/srv/r"]).unwrap();
        assert!(cfg.processes.master, "a reload needs a master");
        assert_eq!(cfg.touch_reload, [PathBuf::from("/srv/r")]);
        let cfg = config(&["--socket", ":1", "--module", "m", "--log-format", "json"]).unwrap();
        assert_eq!((cfg.log.format, cfg.server.access_log_format), (LogFormat::Json, LogFormat::Json));
        assert!(Cli::try_parse_from(["oxwsgi", "--socket", ":1", "--module", "m", "--log-format", "xml"])
            .is_err());
    }

    #[test]
    fn socket_forms() {
        assert_eq!(parse_socket("127.0.0.1:3031"), Ok(SocketSpec::Tcp("127.0.0.1:3031".parse().unwrap())));
        assert_eq!(parse_socket("[::1]:3031"), Ok(SocketSpec::Tcp("[::1]:3031".parse().unwrap())));
        assert_eq!(parse_socket(":3031"), Ok(SocketSpec::Tcp("0.0.0.0:3031".parse().unwrap())));
        assert_eq!(parse_socket("/run/app.sock"), Ok(SocketSpec::Unix("/run/app.sock".into())));
        assert_eq!(parse_socket("unix:app.sock"), Ok(SocketSpec::Unix("app.sock".into())));
        assert!(matches!(parse_socket("localhost:3031"), Ok(SocketSpec::Tcp(_))));
        for bad in ["nonsense", "127.0.0.1:notaport"] {
            assert_eq!(
                parse_socket(bad),
                Err(ConfigError::Address { option: "--socket", value: bad.into() })
            );
        }
    }

    #[test]
    fn module_with_and_without_callable() {
        let cfg = config(&["--socket", ":1", "--module", "pkg.web:app"]).unwrap();
        assert_eq!(cfg.app.source, AppSource::Module("pkg.web".into()));
        assert_eq!(cfg.app.callable, "app");
        let cfg = config(&["--socket", ":1", "--module", "pkg.web"]).unwrap();
        assert_eq!(cfg.app.callable, "application");
        let cfg = config(&["--socket", ":1", "--wsgi-file", "a.py", "--callable", "app"]).unwrap();
        assert_eq!(cfg.app.source, AppSource::File("a.py".into()));
        assert_eq!(cfg.app.callable, "app");
        for flag in ["--virtualenv", "--venv", "--home", "-H"] {
            let cfg = config(&["--socket", ":1", "--module", "m", flag, "/srv/venv"]).unwrap();
            assert_eq!(cfg.app.virtualenv, Some(PathBuf::from("/srv/venv")), "{flag}");
        }
    }

    #[test]
    fn defaults_follow_nginx_not_uwsgi() {
        let cfg = config(&["--socket", ":1", "--module", "m"]).unwrap();
        assert_eq!(cfg.server.limits.max_datasize, 65535);
        assert_eq!(cfg.server.socket_timeout, Duration::from_secs(4));
        assert_eq!(cfg.server.limit_post, None);
        assert_eq!(cfg.pool.threads.get(), 1);
        assert_eq!(cfg.server.chmod_socket, None);
        assert_eq!(cfg.server.graceful_timeout, Duration::from_secs(30));
        assert!(!cfg.processes.master && !cfg.pool.multiprocess);
    }

    #[test]
    fn several_processes_mean_a_master() {
        for flag in ["--processes", "--workers", "-p"] {
            let cfg = config(&["--socket", ":1", "--module", "m", flag, "3"]).unwrap();
            assert_eq!(cfg.processes.workers.get(), 3, "{flag}");
            assert!(cfg.processes.master && cfg.pool.multiprocess);
        }
        let cfg = config(&["--socket", ":1", "--module", "m", "--master"]).unwrap();
        assert!(cfg.processes.master && !cfg.pool.multiprocess);
        assert!(
            Cli::try_parse_from(["oxwsgi", "--socket", ":1", "--module", "m", "--processes", "0"]).is_err()
        );
    }

    #[test]
    fn recycling_needs_a_master() {
        let cfg = config(&["--socket", ":1", "--module", "m", "--max-requests-jitter", "5"]).unwrap();
        assert!(!cfg.processes.master, "jitter alone recycles nothing");
        for option in ["--max-requests", "--reload-on-rss", "--max-worker-lifetime"] {
            let cfg = config(&["--socket", ":1", "--module", "m", option, "50"]).unwrap();
            assert!(cfg.processes.master, "{option}");
        }
        let cfg = config(&["--socket", ":1", "--module", "m", "--reload-on-rss", "2"]).unwrap();
        assert_eq!(cfg.processes.recycle.reload_on_rss, Some(2 * 1024 * 1024));
    }

    #[test]
    fn metrics_and_stats_need_a_master() {
        let cfg = config(&["--socket", ":1", "--module", "m"]).unwrap();
        assert!(!cfg.metrics.enabled());
        let cfg = config(&["--socket", ":1", "--module", "m", "--metrics", ":9191"]).unwrap();
        assert!(cfg.processes.master);
        assert_eq!(cfg.metrics.prometheus, Some("0.0.0.0:9191".parse().unwrap()));
        let cfg = config(&["--socket", ":1", "--module", "m", "--stats", "/run/stats.sock", "--stats-http"])
            .unwrap();
        assert!(cfg.processes.master && cfg.metrics.stats_http);
        assert_eq!(cfg.metrics.stats, Some(SocketSpec::Unix("/run/stats.sock".into())));
        let err = config(&["--socket", ":1", "--module", "m", "--metrics", "/run/m.sock"]).unwrap_err();
        assert!(err.to_string().starts_with("--metrics /run/m.sock: "), "{err}");
        let err = config(&["--socket", ":1", "--module", "m", "--stats", "nohost"]).unwrap_err();
        assert!(err.to_string().starts_with("--stats nohost: expected host:port"), "{err}");
    }

    #[test]
    fn chmod_socket_bare_and_with_mode() {
        let cfg = config(&["--socket", ":1", "--module", "m", "--chmod-socket"]).unwrap();
        assert_eq!(cfg.server.chmod_socket, Some(0o666));
        let cfg = config(&["--socket", ":1", "--module", "m", "--chmod-socket", "660"]).unwrap();
        assert_eq!(cfg.server.chmod_socket, Some(0o660));
        assert_eq!(
            config(&["--socket", ":1", "--module", "m", "--chmod-socket", "rw"]).unwrap_err(),
            ConfigError::Mode("rw".into())
        );
    }

    #[test]
    fn bad_values_give_one_line() {
        let err = config(&["--socket", ":1", "--module", "m", "--buffer-size", "65536"]).unwrap_err();
        assert!(err.to_string().contains("65535"), "{err}");
        assert!(!err.to_string().contains('\n'));
        assert_eq!(
            config(&["--socket", ":1", "--module", "m", "--socket-timeout", "0"]).unwrap_err(),
            ConfigError::SocketTimeoutZero
        );
        assert!(Cli::try_parse_from(["oxwsgi", "--socket", ":1"]).is_err(), "an app is required");
        assert!(Cli::try_parse_from(["oxwsgi", "--socket", ":1", "--module", "m", "--wsgi-file", "f.py"])
            .is_err());
    }
}
