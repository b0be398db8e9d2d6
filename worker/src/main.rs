use clap::Parser;
use kandle_worker::config::{Cli, Command, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Fetch(args) => tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| {
            let config = kandle_worker::fetch::FetchConfig {
                url: args.url,
                dest: args.dest,
                revision: args.revision,
                sha256: args.sha256,
                token: args.hf_token,
                endpoint: args.hf_endpoint,
            };
            let path = rt.block_on(kandle_worker::fetch::run(&config))?;
            println!("{}", path.display());
            Ok(())
        }),
        Command::Serve(config) => {
            // kandle's own kernels run on a pool of this size; candle's (dense
            // checkpoints, other GGUF types) size theirs from these variables,
            // set before any thread starts.
            let threads = if config.threads > 0 { config.threads } else { kandle_worker::resources::cpu_limit() };
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
            tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(kandle_worker::server::serve(config)))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kandle-worker failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KANDLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
