use clap::Parser;
use tracing_subscriber::EnvFilter;
use ztunnel::config::{Command, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    if let Some(Command::CreateRoot {
        trust_domain,
        validity,
        out_dir,
    }) = &cfg.command
    {
        ztunnel::create_root(trust_domain, *validity, out_dir)?;
        println!("wrote {0}/ca.crt and {0}/ca.key", out_dir.display());
        return Ok(());
    }
    for line in cfg.startup_lines() {
        println!("{line}");
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log_format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        }
    };
    ztunnel::run(cfg, shutdown).await?;
    tracing::info!("exiting");
    Ok(())
}
