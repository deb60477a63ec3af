//! The agent's log: text or JSON lines on stderr, filtered like `RUST_LOG`, with a filter that
//! can be changed on a running node (`patina log set`, through the admin socket) and put back
//! (`patina log reset`).
//!
//! The subscriber is global to the process, so the control is too: agents started in-process
//! (tests, loadgen) without [`init`] have no log control, and the admin routes say so.

use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Which events are written, in `RUST_LOG` syntax (`info`, `info,patina::net::gossip=debug`);
    /// `RUST_LOG`, when set, wins. `patina log set` changes it on a running node.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter at start (RUST_LOG, else `[log] filter`), for `log reset`.
    initial: String,
    current: Mutex<String>,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Checks a filter in `RUST_LOG` syntax.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(filter).map_err(|e| format!("bad log filter {filter:?}: {e}"))
}

/// Installs the process's log subscriber. `RUST_LOG`, when set, wins over `config.filter`.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| config.filter.clone());
    let (filter, handle) = reload::Layer::new(parse_filter(&initial)?);
    let (text, json) = match config.format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    // Colours only for a person at a terminal, not in files and collectors.
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none(),
                    )
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))?;
    let _ = CONTROL.set(LogControl {
        handle,
        current: Mutex::new(initial.clone()),
        initial,
    });
    Ok(())
}

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The filter does not parse.
    #[error("{0}")]
    BadFilter(String),
    /// This process installed no controllable subscriber.
    #[error("this process has no log control (the agent was not started by `patina agent`)")]
    NoControl,
}

/// Replaces the filter; returns it.
pub fn set(filter: &str) -> Result<String, LogError> {
    let control = CONTROL.get().ok_or(LogError::NoControl)?;
    let parsed = parse_filter(filter).map_err(LogError::BadFilter)?;
    control
        .handle
        .reload(parsed)
        .map_err(|_| LogError::NoControl)?;
    *control.current.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_string();
    tracing::info!("log filter set to {filter:?}");
    Ok(filter.to_string())
}

/// Puts back the filter the agent started with; returns it.
pub fn reset() -> Result<String, LogError> {
    let initial = CONTROL.get().ok_or(LogError::NoControl)?.initial.clone();
    set(&initial)
}

/// The filter in force, when this process has log control.
pub fn current() -> Option<String> {
    CONTROL
        .get()
        .map(|c| c.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// `tokio::spawn` inside the current span: a task started on behalf of a node (or of a peer)
/// logs under that node's span, whose fields (the site id, the peer's address) are on every
/// line of it.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(future))
}
