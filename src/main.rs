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
