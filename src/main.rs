//! Entry point: parse the command line, load settings, start logging, run.

use clap::Parser;
use os_credits::cli::{Cli, Command};
use os_credits::config::{LogFormat, Settings};
use os_credits::startup::{self, Application};
use os_credits::telemetry;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("os-credits: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::DemoExporter(args)) = &cli.command {
        telemetry::init(LogFormat::Text)?;
        let config = args.config().map_err(anyhow::Error::msg)?;
        let host = cli.host.as_deref().unwrap_or("127.0.0.1");
        return startup::run_demo_exporter(
            config,
            host,
            cli.port.unwrap_or(9100),
            cli.port_file.as_deref(),
        )
        .await;
    }
    let mut settings = Settings::from_env()?;
    if let Some(host) = cli.host {
        settings.host = host;
    }
    if let Some(port) = cli.port {
        settings.port = port;
    }
    let logs = telemetry::init(settings.log_format)?;
    match cli.command {
        Some(Command::Migrate {
            to_timescaledb: true,
            dry_run,
        }) => startup::migrate_to_timescaledb(&settings, dry_run).await,
        Some(Command::Migrate { .. }) => startup::migrate(&settings).await,
        Some(Command::Maintain) => startup::maintain(&settings).await,
        Some(Command::SendTestEmail { to }) => {
            let sent = os_credits::notify::email::send_test(&settings.mail, &to).await?;
            println!("{sent}");
            Ok(())
        }
        _ => {
            let app = Application::build(settings, Some(logs)).await?;
            if let Some(path) = &cli.port_file {
                startup::write_port_file(path, app.port())?;
            }
            app.run_until_stopped().await
        }
    }
}
