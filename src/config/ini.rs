//! uWSGI ini files (`--ini FILE`, or `oxwsgi FILE.ini`): the `[uwsgi]` and `[oxwsgi]` sections turned into
//! command-line arguments that clap then parses with everything else.
//!
//! Owns uWSGI's file syntax (sections, `;`/`#` comment lines, bare keys, repeated keys), its expansions
//! (`%d` and the other magic variables, `$(ENV)`, `%(option)`), the map from uWSGI's option names to ours,
//! and the precedence rule: a file argument is dropped when the same option came from the command line or
//! its `OXWSGI_*` variable, so clap sees the command line over the environment over the file. Everything
//! but [`load`] and [`read`] is pure and tested on strings; no sockets, no Python here.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use super::{Cli, Config, ConfigError};

/// The sections read; `[oxwsgi]` wins over `[uwsgi]` for an option both set, so one file can serve uWSGI
/// and oxwsgi while they run side by side.
const SECTION_UWSGI: &str = "uwsgi";
const SECTION_OXWSGI: &str = "oxwsgi";

/// How deep `%(a)` may refer to a value that refers to another: far more than any real file nests, and a
/// bound that turns a cycle (`a = %(b)`, `b = %(a)`) into an error instead of a stack overflow.
const MAX_REFERENCE_DEPTH: usize = 16;

/// uWSGI options that mean nothing here, accepted without a word. Each is something oxwsgi always does or
/// never needs:
/// - `enable-threads`, `single-interpreter`, `lazy-apps`/`lazy`: Python threads always run, each worker has
///   one interpreter and imports the app itself (nothing is loaded before a fork);
/// - `die-on-term`, `need-app`, `no-orphans`, `harakiri-verbose`: SIGTERM always stops gracefully, an app
///   that cannot be imported always stops the start, workers always die with their master, a harakiri
///   always logs the stuck stack;
/// - `thunder-lock`: each process accepts on its own, with no lock to share;
/// - `plugins`/`plugin`/`plugins-dir`: Python is built in;
/// - `post-buffering`: nginx buffers request bodies before it passes them on (its default);
/// - `ignore-sigpipe`, `ignore-write-errors`, `disable-write-exception`: a client that goes away is never
///   an app error here, nor a crash.
///
/// `strict` is read, not ignored: it makes unknown options an error, as in uWSGI.
const MEANINGLESS: &[&str] = &[
    "enable-threads",
    "single-interpreter",
    "lazy-apps",
    "lazy",
    "die-on-term",
    "need-app",
    "no-orphans",
    "harakiri-verbose",
    "thunder-lock",
    "plugins",
    "plugin",
    "plugins-dir",
    "post-buffering",
    "ignore-sigpipe",
    "ignore-write-errors",
    "disable-write-exception",
];

/// What an option's value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A boolean: `true`/`yes`/`on`/`1`, or a bare key, sets the flag; `false`/`no`/`off`/`0` does not, or
    /// gives the flag named here (`vacuum = false` is `--no-vacuum`).
    Flag(Option<&'static str>),
    /// A whole number of at least 1.
    Count,
    /// A whole number up to this bound (the type clap parses it into).
    Number(u64),
    /// Any non-empty text; the last one in the file wins.
    Text,
    /// Text, and the key may be repeated: every value is kept, in order.
    List,
    /// `KEY=VALUE`, repeatable.
    EnvPair,
    /// Text, or a bare key for the flag without a value (`chmod-socket` alone is mode 666).
    OptionalValue,
}

/// An option oxwsgi has: the keys it is spelled with in a file and the long flag it becomes.
struct Known {
    keys: &'static [&'static str],
    flag: &'static str,
    kind: Kind,
}

const U32_MAX: u64 = u32::MAX as u64;

/// uWSGI's spelling of every option oxwsgi has, then oxwsgi's own names for the rest (for `[oxwsgi]`).
const KNOWN: &[Known] = &[
    Known { keys: &["socket", "uwsgi-socket"], flag: "socket", kind: Kind::List },
    Known { keys: &["http-socket"], flag: "http-socket", kind: Kind::List },
    Known { keys: &["ssl-socket", "suwsgi-socket"], flag: "ssl-socket", kind: Kind::List },
    Known { keys: &["chdir"], flag: "chdir", kind: Kind::Text },
    Known { keys: &["module", "wsgi"], flag: "module", kind: Kind::Text },
    Known { keys: &["wsgi-file", "file"], flag: "wsgi-file", kind: Kind::Text },
    Known { keys: &["callable"], flag: "callable", kind: Kind::Text },
    Known { keys: &["processes", "workers"], flag: "processes", kind: Kind::Count },
    Known { keys: &["threads"], flag: "threads", kind: Kind::Count },
    Known { keys: &["master"], flag: "master", kind: Kind::Flag(None) },
    Known { keys: &["harakiri"], flag: "harakiri", kind: Kind::Number(u64::MAX) },
    Known { keys: &["max-requests"], flag: "max-requests", kind: Kind::Number(u64::MAX) },
    Known {
        keys: &["max-requests-delta", "max-requests-jitter"],
        flag: "max-requests-jitter",
        kind: Kind::Number(u64::MAX),
    },
    Known { keys: &["reload-on-rss"], flag: "reload-on-rss", kind: Kind::Number(u64::MAX) },
    Known { keys: &["max-worker-lifetime"], flag: "max-worker-lifetime", kind: Kind::Number(u64::MAX) },
    Known { keys: &["uid"], flag: "uid", kind: Kind::Text },
    Known { keys: &["gid"], flag: "gid", kind: Kind::Text },
    Known { keys: &["chmod-socket"], flag: "chmod-socket", kind: Kind::OptionalValue },
    Known { keys: &["chown-socket"], flag: "chown-socket", kind: Kind::Text },
    Known { keys: &["vacuum"], flag: "vacuum", kind: Kind::Flag(Some("no-vacuum")) },
    Known { keys: &["pidfile"], flag: "pidfile", kind: Kind::Text },
    Known { keys: &["buffer-size"], flag: "buffer-size", kind: Kind::Number(U32_MAX) },
    Known { keys: &["limit-post"], flag: "limit-post", kind: Kind::Number(u64::MAX) },
    Known { keys: &["socket-timeout"], flag: "socket-timeout", kind: Kind::Number(u64::MAX) },
    Known { keys: &["listen"], flag: "listen", kind: Kind::Number(U32_MAX) },
    Known { keys: &["virtualenv", "home", "venv", "pyhome"], flag: "virtualenv", kind: Kind::Text },
    Known { keys: &["pythonpath", "python-path", "pp"], flag: "pythonpath", kind: Kind::List },
    Known { keys: &["stats"], flag: "stats", kind: Kind::Text },
    Known { keys: &["stats-http"], flag: "stats-http", kind: Kind::Flag(None) },
    Known { keys: &["env"], flag: "env", kind: Kind::EnvPair },
    Known { keys: &["disable-logging"], flag: "disable-logging", kind: Kind::Flag(None) },
    Known { keys: &["touch-reload"], flag: "touch-reload", kind: Kind::List },
    Known { keys: &["logto"], flag: "logto", kind: Kind::Text },
    // oxwsgi's own options, which uWSGI spells differently or lacks.
    Known { keys: &["graceful-timeout"], flag: "graceful-timeout", kind: Kind::Number(u64::MAX) },
    Known { keys: &["metrics"], flag: "metrics", kind: Kind::Text },
];

/// Options that replace one another: given any of a group on the command line (or in the environment),
/// the file's values for the whole group are dropped. `--module` there replaces the file's `wsgi-file`.
const EXCLUSIVE: &[&[&str]] = &[&["module", "wsgi-file"], &["vacuum", "no-vacuum"]];

/// A positional argument is taken as an ini file only with this extension, so a mistyped option value
/// does not silently become a config file name.
const INI_EXTENSION: &str = "ini";

/// What went wrong with the file; `Display` is the one line printed before exiting.
#[derive(Debug, thiserror::Error)]
pub enum IniError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// A line that is neither a section, a comment nor `key = value`/`key`.
    #[error("{}:{line}: {message}", path.display())]
    Syntax { path: PathBuf, line: usize, message: String },
    /// A value that is wrong for its option (as written: `key`).
    #[error("{}:{line}: {key}: {message}", path.display())]
    Value { path: PathBuf, line: usize, key: String, message: String },
    #[error("{}: no [uwsgi] or [oxwsgi] section", path.display())]
    NoSection { path: PathBuf },
    #[error("{}: strict is set and oxwsgi does not know {}", path.display(), unknown.join(", "))]
    Strict { path: PathBuf, unknown: Vec<String> },
}

/// Why the command line and the file make no usable config.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Ini(#[from] IniError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// One `key = value` (or bare `key`) line of a section we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    /// `[oxwsgi]` rather than `[uwsgi]`.
    pub oxwsgi: bool,
    pub key: String,
    /// `None` for a bare key (no `=`).
    pub value: Option<String>,
}

/// Where the file is, for `%d`, `%n` and the rest, and what `$(NAME)` and `%k` read.
pub struct Context<'a> {
    /// The file's absolute path.
    pub path: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// `%k`: CPU cores.
    pub cpus: usize,
}

/// One argument the file adds to the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileArg {
    /// The long flag without dashes (`threads`); the argument is `--threads=VALUE` or `--threads`.
    pub flag: &'static str,
    pub value: Option<String>,
    /// Where it was written, for errors: the line and the key as spelled there.
    pub line: usize,
    pub key: String,
}

impl FileArg {
    pub fn to_arg(&self) -> String {
        match &self.value {
            Some(value) => format!("--{}={value}", self.flag),
            None => format!("--{}", self.flag),
        }
    }
}

/// What a file says, ready to be merged under the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    pub args: Vec<FileArg>,
    /// Keys oxwsgi does not know (each once, in file order).
    pub unknown: Vec<String>,
    /// `strict = true`: unknown keys are an error.
    pub strict: bool,
}

/// The file's lines as entries of `[uwsgi]` and `[oxwsgi]`, values trimmed; other sections are skipped.
///
/// ```text
/// file    = { line "\n" }
/// line    = blank | comment | section | key [ "=" value ]
/// comment = ( ";" | "#" ) anything          ; only at the start of a line: a value may contain both
/// section = "[" name "]"
/// ```
///
/// `Ok(None)` when the file has neither section.
pub fn parse_ini(text: &str) -> Result<Option<Vec<Entry>>, (usize, String)> {
    let mut section: Option<bool> = None;
    let mut seen_section = false;
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name =
                rest.strip_suffix(']').ok_or((line, format!("{trimmed}: a section needs a closing ]")))?;
            section = match name.trim() {
                SECTION_UWSGI => Some(false),
                SECTION_OXWSGI => Some(true),
                _ => None,
            };
            seen_section |= section.is_some();
            continue;
        }
        let Some(oxwsgi) = section else { continue };
        let (key, value) = match trimmed.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim().to_owned())),
            None => (trimmed, None),
        };
        if key.is_empty() {
            return Err((line, format!("{trimmed}: no option name before =")));
        }
        entries.push(Entry { line, oxwsgi, key: key.to_owned(), value });
    }
    Ok(seen_section.then_some(entries))
}

/// Expands uWSGI's magic variables and `$(NAME)` in one value; `%(name)` is left for [`expand_references`].
///
/// `%d` the file's directory with a trailing `/`, `%p` the file's path, `%s` its name, `%n` its name without
/// the extension, `%e` the extension, `%c` the name of its directory, `%k` CPU cores. Any other `%x` stays
/// as written, as in uWSGI.
pub fn expand_magic(value: &str, ctx: &Context<'_>) -> Result<String, String> {
    let path = ctx.path;
    let text = |s: Option<&std::ffi::OsStr>| s.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find(['%', '$']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(name_and_more) = tail.strip_prefix("$(") {
            let (name, after) = name_and_more.split_once(')').ok_or("$( without a closing )")?;
            let found = (ctx.env)(name).ok_or_else(|| format!("$({name}): the environment has no {name}"))?;
            out.push_str(&found);
            rest = after;
            continue;
        }
        let mut chars = tail[1..].chars();
        let expanded = match (tail.as_bytes()[0], chars.next()) {
            // With the trailing slash, as uWSGI gives it: `%dapp.py`.
            (b'%', Some('d')) => Some(match path.parent().map(|dir| dir.display().to_string()) {
                Some(dir) if !dir.ends_with('/') => format!("{dir}/"),
                Some(dir) => dir,
                None => "/".to_owned(),
            }),
            (b'%', Some('p')) => Some(path.display().to_string()),
            (b'%', Some('s')) => Some(text(path.file_name())),
            (b'%', Some('n')) => Some(text(path.file_stem())),
            (b'%', Some('e')) => Some(text(path.extension())),
            (b'%', Some('c')) => Some(text(path.parent().and_then(Path::file_name))),
            (b'%', Some('k')) => Some(ctx.cpus.to_string()),
            _ => None,
        };
        if let Some(expanded) = expanded {
            out.push_str(&expanded);
            rest = &tail[2..];
        } else {
            // `%(`, `%x` we do not know, a lone `$`: kept as written.
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Replaces every `%(name)` in `value` with the value of the option or placeholder `name` (`values`:
/// each key's winning value, itself expanded the same way).
fn expand_references(value: &str, values: &HashMap<&str, &str>) -> Result<String, String> {
    expand_references_within(value, values, 0)
}

fn expand_references_within(
    value: &str,
    values: &HashMap<&str, &str>,
    depth: usize,
) -> Result<String, String> {
    if depth > MAX_REFERENCE_DEPTH {
        return Err(format!("references nest deeper than {MAX_REFERENCE_DEPTH} (a cycle?)"));
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find("%(") {
        out.push_str(&rest[..at]);
        let (name, after) = rest[at + 2..].split_once(')').ok_or("%( without a closing )")?;
        let found = values.get(name).ok_or_else(|| format!("%({name}): no option {name} in the file"))?;
        out.push_str(&expand_references_within(found, values, depth + 1)?);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The names `%(name)` refers to in `value`.
fn references(value: &str) -> impl Iterator<Item = &str> {
    value.split("%(").skip(1).filter_map(|part| part.split_once(')').map(|(name, _)| name))
}

/// Parses and expands `text` (the file at `ctx.path`) into the arguments it adds, in file order.
pub fn parse_file(text: &str, ctx: &Context<'_>) -> Result<FileOptions, IniError> {
    let path = ctx.path.to_path_buf();
    let entries = parse_ini(text)
        .map_err(|(line, message)| IniError::Syntax { path: path.clone(), line, message })?
        .ok_or_else(|| IniError::NoSection { path: path.clone() })?;
    let value_error = |entry: &Entry, message: String| IniError::Value {
        path: path.clone(),
        line: entry.line,
        key: entry.key.clone(),
        message,
    };
    // Magic and the environment first, line by line (uWSGI expands them as it reads).
    let mut expanded = Vec::with_capacity(entries.len());
    for entry in entries {
        let value = match &entry.value {
            Some(value) => Some(expand_magic(value, ctx).map_err(|m| value_error(&entry, m))?),
            None => None,
        };
        expanded.push(Entry { value, ..entry });
    }
    // `%(name)` sees each key's winning value: `[oxwsgi]` over `[uwsgi]`, then the last one.
    let winner = |entry: &&Entry| (entry.oxwsgi, entry.line);
    let mut values: HashMap<&str, &Entry> = HashMap::new();
    for entry in &expanded {
        if values.get(entry.key.as_str()).is_none_or(|old| winner(old) < winner(&entry)) {
            values.insert(&entry.key, entry);
        }
    }
    let plain: HashMap<&str, &str> =
        values.iter().map(|(key, entry)| (*key, entry.value.as_deref().unwrap_or(""))).collect();
    let referenced: BTreeSet<&str> =
        expanded.iter().filter_map(|e| e.value.as_deref()).flat_map(references).collect();
    let mut resolved = Vec::with_capacity(expanded.len());
    for entry in &expanded {
        let value = match &entry.value {
            Some(value) => Some(expand_references(value, &plain).map_err(|m| value_error(entry, m))?),
            None => None,
        };
        resolved.push(Entry { value, ..entry.clone() });
    }
    let mut options = FileOptions { args: Vec::new(), unknown: Vec::new(), strict: false };
    // Each known option's entries: `[oxwsgi]` ones replace `[uwsgi]` ones; a single value is the last one.
    for known in KNOWN {
        let mine: Vec<&Entry> = resolved.iter().filter(|e| known.keys.contains(&e.key.as_str())).collect();
        let oxwsgi_sets = mine.iter().any(|e| e.oxwsgi);
        let mut mine: Vec<&Entry> = mine.into_iter().filter(|e| e.oxwsgi == oxwsgi_sets).collect();
        if !matches!(known.kind, Kind::List | Kind::EnvPair) {
            mine.drain(..mine.len().saturating_sub(1));
        }
        for entry in mine {
            if let Some(arg) = to_arg(known, entry).map_err(|m| value_error(entry, m))? {
                options.args.push(arg);
            }
        }
    }
    options.args.sort_by_key(|arg| arg.line);
    for entry in &resolved {
        let key = entry.key.as_str();
        if key == "strict" {
            options.strict = parse_bool(entry.value.as_deref()).map_err(|m| value_error(entry, m))?;
        } else if !KNOWN.iter().any(|k| k.keys.contains(&key))
            && !MEANINGLESS.contains(&key)
            && !referenced.contains(key)
            && !options.unknown.iter().any(|u| u == key)
        {
            options.unknown.push(entry.key.clone());
        }
    }
    Ok(options)
}

/// uWSGI's booleans; anything else is more likely a typo than a yes.
fn parse_bool(value: Option<&str>) -> Result<bool, String> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("" | "true" | "yes" | "on" | "1") => Ok(true),
        Some("false" | "no" | "off" | "0") => Ok(false),
        Some(other) => Err(format!("{other}: expected true or false (also yes/no, on/off, 1/0)")),
    }
}

/// The argument one entry gives, checked for its kind; `None` for a flag that is off.
fn to_arg(known: &Known, entry: &Entry) -> Result<Option<FileArg>, String> {
    let arg = |flag, value| Some(FileArg { flag, value, line: entry.line, key: entry.key.clone() });
    let text = || match entry.value.as_deref() {
        None | Some("") => Err("needs a value".to_owned()),
        Some(value) => Ok(value.to_owned()),
    };
    let number = |max: u64, min: u64| -> Result<String, String> {
        let value = text()?;
        match value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(value),
            _ if min > 0 => Err(format!("{value}: expected a whole number of at least {min}")),
            _ => Err(format!("{value}: expected a whole number from 0 to {max}")),
        }
    };
    Ok(match known.kind {
        Kind::Flag(negation) => match (parse_bool(entry.value.as_deref())?, negation) {
            (true, _) => arg(known.flag, None),
            (false, Some(negation)) => arg(negation, None),
            (false, None) => None,
        },
        Kind::Count => arg(known.flag, Some(number(u64::MAX, 1)?)),
        Kind::Number(max) => arg(known.flag, Some(number(max, 0)?)),
        Kind::Text | Kind::List => arg(known.flag, Some(text()?)),
        Kind::EnvPair => {
            let pair = text()?;
            if pair.split_once('=').is_none_or(|(key, _)| key.is_empty()) {
                return Err(format!("{pair}: expected KEY=VALUE"));
            }
            arg(known.flag, Some(pair))
        }
        Kind::OptionalValue => arg(known.flag, entry.value.clone().filter(|v| !v.is_empty())),
    })
}

/// Reads the file at `path` (the only I/O here besides [`load`]), expanding `$(NAME)` from the process
/// environment.
pub fn read(path: &Path) -> Result<FileOptions, IniError> {
    let read_error = |source| IniError::Read { path: path.to_path_buf(), source };
    let absolute = std::path::absolute(path).map_err(read_error)?;
    let text = std::fs::read_to_string(&absolute).map_err(read_error)?;
    let env = |name: &str| std::env::var(name).ok();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    parse_file(&text, &Context { path: &absolute, env: &env, cpus })
}

/// clap's check of `oxwsgi FILE.ini`: a positional argument must name an ini file.
pub fn parse_positional(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.extension().is_some_and(|e| e == INI_EXTENSION) {
        Ok(path)
    } else {
        Err(format!("expected an ini file (FILE.{INI_EXTENSION}); use --ini for a file named otherwise"))
    }
}

/// The config from the command line `args`, over the `OXWSGI_*` environment, over the ini file if one is
/// named; with the one warning line about options the file has that oxwsgi does not know. Exits, as clap
/// does, on `--help`, `--version` and a malformed command line.
pub fn load<I, T>(args: I) -> Result<(Config, Option<String>), LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // A first look, forgiving (the file may supply --module), only for the file's name and for which
    // options the command line and the environment already set.
    let first = Cli::command().ignore_errors(true).try_get_matches_from(&args);
    let Some(path) = first
        .as_ref()
        .ok()
        .and_then(|m| m.get_one::<PathBuf>("ini").or_else(|| m.get_one::<PathBuf>("ini_file")).cloned())
    else {
        return Ok((Config::try_from(Cli::parse_from(args))?, None));
    };
    let Ok(first) = first else { unreachable!("a path was found in the matches") };
    let file = read(&path)?;
    let command = Cli::command();
    let id_of = |flag: &str| {
        command.get_arguments().find(|a| a.get_long() == Some(flag)).map(|a| a.get_id().as_str().to_owned())
    };
    let set_above_file = |flag: &str| {
        id_of(flag).is_some_and(|id| {
            matches!(first.value_source(&id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        })
    };
    let (args_from_file, unknown) = merge(&file, |flag| id_of(flag).is_some(), set_above_file);
    if file.strict && !unknown.is_empty() {
        return Err(IniError::Strict { path, unknown }.into());
    }
    // The program name, the file's arguments, then the command line's: clap sees each option once.
    let mut argv: Vec<OsString> = args.iter().take(1).cloned().collect();
    argv.extend(args_from_file.iter().map(|a| OsString::from(a.to_arg())));
    argv.extend(args.into_iter().skip(1));
    let matches = Cli::command().get_matches_from(argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let config = Config::try_from(cli).map_err(|err| {
        // A value from the file that the config refuses is reported at its line.
        let from_file = err.option().and_then(|option| {
            args_from_file.iter().rev().find(|a| option.strip_prefix("--") == Some(a.flag))
        });
        match from_file {
            Some(arg) => LoadError::Ini(IniError::Value {
                path: path.clone(),
                line: arg.line,
                key: arg.key.clone(),
                message: err.to_string(),
            }),
            None => LoadError::Config(err),
        }
    })?;
    let warning = (!unknown.is_empty()).then(|| {
        format!("{}: options oxwsgi does not know, ignored: {}", path.display(), unknown.join(", "))
    });
    Ok((config, warning))
}

/// The file's arguments that stay under the command line and the environment (`set_above_file(flag)`),
/// and the keys oxwsgi does not know: the file's unknown ones, and options this build lacks
/// (`has_flag(flag)` false).
pub fn merge(
    file: &FileOptions,
    has_flag: impl Fn(&str) -> bool,
    set_above_file: impl Fn(&str) -> bool,
) -> (Vec<FileArg>, Vec<String>) {
    let mut unknown = file.unknown.clone();
    let group = |flag: &'static str| -> Vec<&'static str> {
        EXCLUSIVE.iter().find(|g| g.contains(&flag)).map_or_else(|| vec![flag], |g| g.to_vec())
    };
    let mut kept = Vec::new();
    for arg in &file.args {
        if !has_flag(arg.flag) {
            if !unknown.contains(&arg.key) {
                unknown.push(arg.key.clone());
            }
        } else if !group(arg.flag).into_iter().any(&set_above_file) {
            kept.push(arg.clone());
        }
    }
    (kept, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/srv/shop/deploy/shop.ini";

    fn parse_with_env(text: &str, env: &[(&str, &str)]) -> Result<FileOptions, IniError> {
        let env: HashMap<String, String> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let lookup = move |name: &str| env.get(name).cloned();
        parse_file(text, &Context { path: Path::new(PATH), env: &lookup, cpus: 8 })
    }

    fn parse(text: &str) -> Result<FileOptions, IniError> {
        parse_with_env(text, &[])
    }

    fn args(text: &str) -> Vec<String> {
        parse(text).unwrap().args.iter().map(FileArg::to_arg).collect()
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn sections_comments_and_bare_keys() {
        let text = "; top comment\nignored = before any section\n[uwsgi]\n  # indented comment\nmaster\n\
                    socket = /run/a.sock ; kept: uWSGI ends a comment only at a line's start\n\
                    [other]\nthreads = 9\n[uwsgi]\nthreads=4\n";
        let entries = parse_ini(text).unwrap().unwrap();
        let seen: Vec<_> = entries.iter().map(|e| (e.line, e.key.as_str(), e.value.as_deref())).collect();
        assert_eq!(
            seen,
            [
                (5, "master", None),
                (6, "socket", Some("/run/a.sock ; kept: uWSGI ends a comment only at a line's start")),
                (10, "threads", Some("4")),
            ]
        );
        assert_eq!(parse_ini("[app]\nx = 1\n"), Ok(None));
        assert_eq!(parse_ini("[uwsgi\n").unwrap_err().0, 1);
        assert_eq!(parse_ini("[uwsgi]\n= 3\n").unwrap_err().0, 2);
    }

    #[test]
    fn magic_variables_and_the_environment() {
        let env = |name: &str| (name == "HOME_DIR").then(|| "/home/shop".to_owned());
        let ctx = Context { path: Path::new(PATH), env: &env, cpus: 8 };
        let expand = |value| expand_magic(value, &ctx);
        assert_eq!(expand("%dapp.py").unwrap(), "/srv/shop/deploy/app.py");
        assert_eq!(expand("/run/%n.sock").unwrap(), "/run/shop.sock");
        assert_eq!(expand("%p %s %e %c %k").unwrap(), "/srv/shop/deploy/shop.ini shop.ini ini deploy 8");
        assert_eq!(expand("$(HOME_DIR)/venv").unwrap(), "/home/shop/venv");
        assert_eq!(expand("100% %x $ %(kept)").unwrap(), "100% %x $ %(kept)");
        assert!(expand("$(NOT_SET)").unwrap_err().contains("NOT_SET"));
        assert!(expand("$(HOME_DIR").is_err());
        let root = Context { path: Path::new("/a.ini"), env: &env, cpus: 1 };
        assert_eq!(expand_magic("%dx", &root).unwrap(), "/x");
    }

    #[test]
    fn references_to_other_options_and_placeholders() {
        let text = "[uwsgi]\nproject = shop\nbase = /srv/%(project)\nchdir = %(base)/src\n\
                    module = %(project).wsgi:application\nprocesses = 2\nthreads = %(processes)\n\
                    [oxwsgi]\nprocesses = 3\n";
        assert_eq!(
            args(text),
            ["--chdir=/srv/shop/src", "--module=shop.wsgi:application", "--threads=3", "--processes=3"]
        );
        assert!(parse(text).unwrap().unknown.is_empty(), "placeholders used by %() are not unknown");
        assert_eq!(
            error("[uwsgi]\nchdir = %(nowhere)\n"),
            format!("{PATH}:2: chdir: %(nowhere): no option nowhere in the file")
        );
        assert!(error("[uwsgi]\na = %(b)\nb = %(a)\nchdir = %(a)\n").contains("a cycle"));
    }

    #[test]
    fn repeated_keys_make_lists_and_the_last_single_value_wins() {
        let text = "[uwsgi]\nsocket = /run/a.sock\nuwsgi-socket = 127.0.0.1:3031\nthreads = 2\nthreads = 4\n\
                    pythonpath = /srv/lib\npythonpath = /srv/vendor\nenv = DJANGO_SETTINGS_MODULE=shop.settings\n\
                    env = LANG=C.UTF-8\ntouch-reload = /srv/reload\nworkers = 5\n";
        assert_eq!(
            args(text),
            [
                "--socket=/run/a.sock",
                "--socket=127.0.0.1:3031",
                "--threads=4",
                "--pythonpath=/srv/lib",
                "--pythonpath=/srv/vendor",
                "--env=DJANGO_SETTINGS_MODULE=shop.settings",
                "--env=LANG=C.UTF-8",
                "--touch-reload=/srv/reload",
                "--processes=5",
            ]
        );
    }

    #[test]
    fn the_oxwsgi_section_wins_over_uwsgi() {
        let text = "[oxwsgi]\nsocket = /run/ox.sock\nthreads = 8\n[uwsgi]\nsocket = /run/a.sock\n\
                    socket = /run/b.sock\nthreads = 2\nharakiri = 30\n";
        assert_eq!(args(text), ["--socket=/run/ox.sock", "--threads=8", "--harakiri=30"]);
    }

    #[test]
    fn booleans_as_uwsgi_writes_them() {
        for on in ["master", "master = true", "master = 1", "master = yes", "master = On"] {
            assert_eq!(args(&format!("[uwsgi]\n{on}\n")), ["--master"], "{on}");
        }
        for off in ["master = false", "master = 0", "master = no", "master = off"] {
            assert!(args(&format!("[uwsgi]\n{off}\n")).is_empty(), "{off}");
        }
        assert_eq!(args("[uwsgi]\nvacuum = false\n"), ["--no-vacuum"]);
        assert_eq!(args("[uwsgi]\nvacuum = true\n"), ["--vacuum"]);
        assert_eq!(
            error("[uwsgi]\nsocket = :1\nmaster = ture\n"),
            format!("{PATH}:3: master: ture: expected true or false (also yes/no, on/off, 1/0)")
        );
        assert_eq!(args("[uwsgi]\nchmod-socket\n"), ["--chmod-socket"]);
        assert_eq!(args("[uwsgi]\nchmod-socket = 660\n"), ["--chmod-socket=660"]);
    }

    #[test]
    fn wrong_values_name_the_file_the_line_and_the_option() {
        assert_eq!(
            error("[uwsgi]\n\nprocesses = four\n"),
            format!("{PATH}:3: processes: four: expected a whole number of at least 1")
        );
        assert_eq!(
            error("[uwsgi]\nthreads = 0\n"),
            format!("{PATH}:2: threads: 0: expected a whole number of at least 1")
        );
        assert_eq!(
            error("[uwsgi]\nlisten = 5000000000\n"),
            format!("{PATH}:2: listen: 5000000000: expected a whole number from 0 to 4294967295")
        );
        assert_eq!(error("[uwsgi]\nmodule =\n"), format!("{PATH}:2: module: needs a value"));
        assert_eq!(
            error("[uwsgi]\nenv = JUSTAKEY\n"),
            format!("{PATH}:2: env: JUSTAKEY: expected KEY=VALUE")
        );
        assert_eq!(error("[app]\nx = 1\n"), format!("{PATH}: no [uwsgi] or [oxwsgi] section"));
    }

    #[test]
    fn unknown_and_meaningless_options() {
        let text = "[uwsgi]\nmodule = shop.wsgi\nenable-threads = true\ndie-on-term\nlazy-apps = true\n\
                    plugins = python3\nauto-procname = true\nprocname-prefix = shop-\nmemory-report\n\
                    auto-procname = false\n";
        let options = parse(text).unwrap();
        assert_eq!(options.unknown, ["auto-procname", "procname-prefix", "memory-report"]);
        assert!(!options.strict);
        assert!(parse("[uwsgi]\nstrict = true\n").unwrap().strict);
    }

    #[test]
    fn the_command_line_and_environment_replace_the_files_options() {
        let file = parse(
            "[uwsgi]\nsocket = /run/a.sock\nsocket = /run/b.sock\nwsgi-file = %dapp.py\nvacuum = false\n\
             threads = 4\ntouch-reload = /srv/reload\nnot-an-option = 1\n",
        )
        .unwrap();
        let has = |flag: &str| flag != "touch-reload";
        let above = |flag: &str| ["socket", "module", "vacuum"].contains(&flag);
        let (kept, unknown) = merge(&file, has, above);
        assert_eq!(kept.iter().map(FileArg::to_arg).collect::<Vec<_>>(), ["--threads=4"]);
        assert_eq!(unknown, ["not-an-option", "touch-reload"]);
    }

    #[test]
    fn a_positional_argument_must_be_an_ini_file() {
        assert_eq!(parse_positional("deploy/shop.ini"), Ok(PathBuf::from("deploy/shop.ini")));
        assert!(parse_positional("shop.wsgi").is_err());
    }
}
