//! The `stoa` command line: serve a configuration, check one, or print the schema of one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A fast general-purpose allocator: the request path allocates small, short-lived
/// buffers (headers, keys) at a high rate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc frees pages lazily: a page freed is purged (given back to the system) only after
/// a delay, and only when a thread of the process allocates or collects again. The rate-limit
/// pruner calls this after each round, `force` after one that dropped many clients, so that
/// the memory of a flood of client ids is given back once they are forgotten, even when the
/// server is idle.
fn release_memory(force: bool) {
    // SAFETY: mi_collect takes no pointer; it collects the calling thread's heap and purges
    // the process's free arena pages, and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(force) }
}
use stoa::config::{self, EnvOverrides};

/// stoa: a caching reverse proxy and API aggregator for slow JSON APIs.
#[derive(Debug, Parser)]
#[command(name = "stoa", version, about, long_about = None)]
struct Cli {
    /// The TOML configuration file. Keys can be overridden from the environment as
    /// STOA_<SECTION>__<KEY>, e.g. STOA_SERVER__LISTEN=0.0.0.0:8080.
    #[arg(long, short, global = true, env = "STOA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configuration (the default).
    Run,
    /// Validate the configuration without serving; list every problem and exit 1 if any.
    Check,
    /// Print the JSON Schema of the configuration file (shipped as config/stoa.schema.json).
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Schema) = cli.command {
        print!("{}", config::schema_json());
        return ExitCode::SUCCESS;
    }
    let Some(path) = cli.config else {
        eprintln!("stoa: no configuration file; pass --config FILE (or set STOA_CONFIG)");
        return ExitCode::from(2);
    };
    let loaded = config::load(&path, EnvOverrides::Apply);
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => match loaded {
            Ok(config) => {
                println!("{}: {}", path.display(), config.summary());
                for warning in config.warnings() {
                    println!("  warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                report(&path, &errors);
                ExitCode::FAILURE
            }
        },
        // Printed above, before any configuration is read.
        Command::Schema => ExitCode::SUCCESS,
        Command::Run => {
            let config = match loaded {
                Ok(config) => config,
                Err(errors) => {
                    report(&path, &errors);
                    return ExitCode::FAILURE;
                }
            };
            let _log_writer = match stoa::telemetry::init(&config.log) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("stoa: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = stoa::otel::init(config.tracing.as_ref()) {
                eprintln!("stoa: tracing: {e:#}");
                return ExitCode::FAILURE;
            }
            stoa::app::set_memory_release(release_memory);
            let ran = stoa::app::run(config, path, EnvOverrides::Apply);
            // The spans still queued go to the collector (a few seconds at most).
            stoa::otel::shutdown();
            match ran {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("stoa: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn report(path: &std::path::Path, errors: &config::ConfigErrors) {
    eprintln!(
        "{}: {} problem(s) in the configuration:",
        path.display(),
        errors.0.len()
    );
    for problem in &errors.0 {
        eprintln!("  {problem}");
    }
}
