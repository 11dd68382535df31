//! The `berth` command line: parses flags, calls the library, maps outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use berth::descriptor::{self, LoadOptions, load::DEFAULT_MAX_FILE_SIZE};
use clap::{Parser, Subcommand, ValueEnum};

/// berth makes running infrastructure match a git repository of YAML descriptors.
#[derive(Parser)]
#[command(name = "berth", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every descriptor under DIR and report every problem with its file, line and column.
    ///
    /// Exit codes: 0 all valid, 1 problems found, 2 DIR missing or unreadable.
    Validate {
        /// The config repo's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ProblemFormat::Text)]
        format: ProblemFormat,
        #[command(flatten)]
        load: LoadFlags,
    },
    /// Write the JSON Schemas of the descriptor kinds (generated from berth's own types).
    Schema {
        /// Folder to write the schema files to.
        #[arg(long, default_value = "schema")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct LoadFlags {
    /// Largest descriptor file berth reads, in bytes.
    #[arg(long, env = "BERTH_MAX_FILE_SIZE", default_value_t = DEFAULT_MAX_FILE_SIZE)]
    max_file_size: u64,
}

impl LoadFlags {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            max_file_size: self.max_file_size,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProblemFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { dir, format, load } => validate(&dir, format, &load.options()),
        Command::Schema { out } => write_schemas(&out),
    }
}

fn validate(dir: &std::path::Path, format: ProblemFormat, options: &LoadOptions) -> ExitCode {
    let loaded = match descriptor::load(dir, options) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("berth: {error}");
            return ExitCode::from(2);
        }
    };
    match format {
        ProblemFormat::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&loaded.problems).expect("problems serialize")
            );
        }
        ProblemFormat::Text if loaded.is_valid() => println!("{}", loaded.summary()),
        ProblemFormat::Text => {
            for problem in &loaded.problems {
                println!("{problem}");
            }
            let n = loaded.problems.len();
            eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
        }
    }
    if loaded.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_schemas(out: &std::path::Path) -> ExitCode {
    if let Err(error) = std::fs::create_dir_all(out) {
        eprintln!("berth: cannot create {}: {error}", out.display());
        return ExitCode::from(2);
    }
    for (file, schema) in descriptor::schema::generate() {
        let path = out.join(file);
        let text = serde_json::to_string_pretty(&schema).expect("schemas serialize") + "\n";
        if let Err(error) = std::fs::write(&path, text) {
            eprintln!("berth: cannot write {}: {error}", path.display());
            return ExitCode::from(2);
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
