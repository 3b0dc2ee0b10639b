//! Cluster key resolution for the command line: explicit file, environment, or generated.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use transport::ClusterKey;
use transport::key::{self, KeyOrigin};

/// Where the cluster key comes from.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// File holding the hex cluster key (mode 0600). Without it: $SINEW_CLUSTER_KEY, then
    /// ~/.config/sinew/cluster.key, generated on first use.
    #[arg(long, value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// Resolves the key, telling the user how to share it when it was just generated.
    pub fn resolve(&self) -> anyhow::Result<ClusterKey> {
        let (key, origin) = key::resolve_from_environment(self.cluster_key_file.as_deref())
            .context("no usable cluster key")?;
        match &origin {
            KeyOrigin::Generated(path) => eprintln!("sinew: {}", key::copy_instructions(path)),
            other => tracing::debug!("cluster key from {other}"),
        }
        Ok(key)
    }
}
