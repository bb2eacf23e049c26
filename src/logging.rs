//! Logging to stderr (journald and launchd collect it), with a filter that
//! a configuration reload can change.

use std::sync::OnceLock;

use anyhow::Context as _;
use tracing_subscriber::{EnvFilter, Registry, prelude::*, reload};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn parse(filter: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::try_new(filter).with_context(|| format!("log filter {filter:?} is not valid"))
}

pub fn init(filter: &str) -> anyhow::Result<()> {
    let (filter, handle) = reload::Layer::new(parse(filter)?);
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    let _ = FILTER.set(handle);
    Ok(())
}

/// Replaces the filter (on reload); an invalid one changes nothing.
pub fn set_filter(filter: &str) -> anyhow::Result<()> {
    let new = parse(filter)?;
    let handle = FILTER.get().context("logging is not set up")?;
    handle
        .reload(new)
        .map_err(|e| anyhow::anyhow!("cannot change the log filter: {e}"))
}

/// Whether `filter` is a valid log filter.
pub fn check(filter: &str) -> anyhow::Result<()> {
    parse(filter).map(drop)
}
