use std::process::ExitCode;

use clap::Parser;
use detector::cli::{Cli, Command, LogFormat, PolicyCommand};
use tracing_subscriber::{fmt, EnvFilter};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries findings (and debug events) as JSON lines.
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => args.resolve().and_then(|settings| {
            detector::daemon::limit_malloc_arenas();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(detector::daemon::run(settings))
        }),
        Command::Policy {
            command: PolicyCommand::Check { paths },
        } => {
            return match detector::policy::check_cli(&paths) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Inventory(args) => detector::inventory::run_cli(&args),
        Command::Unpin { pin_dir } => detector::loader::unpin_all(&pin_dir).map(|()| {
            println!(
                "unpinned and detached everything under {}",
                pin_dir.display()
            );
        }),
        Command::Learn(args) => args.resolve().and_then(|settings| {
            detector::daemon::limit_malloc_arenas();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(detector::daemon::run(settings))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
