//! `sipwarden`: parse the command line, load and validate the config without binding anything,
//! then run the proxy or one admin command. Exit 64 on a bad config.

use std::process::ExitCode;

use clap::Parser;
use sipwarden::cli::{Cli, Command};
use sipwarden::config::{Config, LogFormat};

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Panics on attacker input are caught per message and counted (`sipwarden_panics_total`), but
/// the default hook would still print each one: an attacker who finds one could flood the log.
/// Report at most one a second, with how many were left out since the last report.
fn rate_limit_panic_reports() {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    static LEFT_OUT: AtomicU64 = AtomicU64::new(0);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let now = sipwarden::clock::wall_ms() / 1000;
        let last = LAST_SECOND.load(Relaxed);
        if now != last
            && LAST_SECOND
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let left_out = LEFT_OUT.swap(0, Relaxed);
            if left_out > 0 {
                tracing::error!(left_out, "more panics since the last report");
            }
            default(info);
        } else {
            LEFT_OUT.fetch_add(1, Relaxed);
        }
    }));
}

fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("sipwarden: cannot start the runtime: {e}"))
        .ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sipwarden: {}: {e}", cli.config.display());
            return ExitCode::from(if matches!(command, Command::Check) {
                1
            } else {
                64
            });
        }
    };
    match command {
        Command::Check => {
            print!("{}", cfg.to_toml());
            ExitCode::SUCCESS
        }
        Command::Run => {
            init_logging(&cfg);
            rate_limit_panic_reports();
            let Some(rt) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(run(cfg, cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sipwarden: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        other => {
            let Some(rt) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            match rt.block_on(admin_command(&cfg, &other)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sipwarden: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cfg: Config, path: std::path::PathBuf) -> anyhow::Result<()> {
    let bound = sipwarden::server::bind(&cfg).await?;
    let shutdown = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    sipwarden::server::run(cfg, Some(path), bound, shutdown).await?;
    Ok(())
}

async fn admin_command(cfg: &Config, cmd: &Command) -> Result<(), String> {
    sipwarden::admin::client::run(cfg, cmd).await
}
