use clap::Parser;
use ztunnel::config::{Command, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    if let Some(Command::Version) = &cfg.command {
        println!("{}", ztunnel::config::build_info());
        return Ok(());
    }
    if let Some(Command::CreateRoot {
        trust_domain,
        validity,
        out_dir,
        overwrite,
    }) = &cfg.command
    {
        ztunnel::create_root(trust_domain, *validity, out_dir, *overwrite)?;
        println!("wrote {0}/ca.crt and {0}/ca.key", out_dir.display());
        return Ok(());
    }
    for line in cfg.startup_lines() {
        println!("{line}");
    }
    let logs = ztunnel::telemetry::init(cfg.log_format == "json");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        }
    };
    ztunnel::run(cfg, Some(logs), shutdown).await?;
    tracing::info!("exiting");
    Ok(())
}
