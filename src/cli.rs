//! The command line: `run` (default) and `check` start or validate; the others are admin
//! clients that talk to a running node's API, using the admin address and token from the same
//! config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sipwarden",
    version,
    about = "SIP security proxy in front of a PBX"
)]
pub struct Cli {
    /// Config file.
    #[arg(short, long, global = true, default_value = "proxy.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the proxy (the default).
    Run,
    /// Validate the config, print the effective one, exit 0 (valid) or 1.
    Check,
    /// The block table.
    Blocks {
        #[command(subcommand)]
        action: Option<BlocksAction>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Block an IP (or IP:port) by hand.
    Block(BlockArgs),
    /// Remove the blocks on an IP now.
    Unblock { ip: String },
    /// The whitelist: CIDRs never blocked.
    Whitelist {
        #[command(subcommand)]
        action: ListAction,
    },
    /// The static blacklist: CIDRs always blocked.
    Blacklist {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Ask the running node to reload its config file.
    Reload,
    /// Counters from the running node.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The toll-fraud guard: accounts near or over a threshold, calls up, top destinations.
    Fraud {
        #[arg(long)]
        json: bool,
    },
    /// The threat feeds: entries, last update, errors.
    Feeds {
        #[arg(long)]
        json: bool,
    },
    /// The cluster: this node, the nodes seen through Redis (last contact, lag), the link.
    Cluster {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BlocksAction {
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct BlockArgs {
    pub ip: String,
    /// Duration like 90s, 10m, 1h; permanent when omitted.
    #[arg(long = "for")]
    pub duration: Option<String>,
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ListAction {
    List {
        #[arg(long)]
        json: bool,
    },
    Add {
        cidr: String,
        #[arg(long)]
        comment: Option<String>,
    },
    Rm {
        cidr: String,
    },
}
