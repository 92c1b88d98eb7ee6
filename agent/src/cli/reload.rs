//! `sessiongate reload`: makes a running agent re-read its config.

use hyper::Method;

use super::{Target, target::decode};
use crate::{api::client::ClientError, errln, outln, wire::Reloaded};

/// `sessiongate reload`.
pub(super) async fn execute(target: &Target) -> anyhow::Result<()> {
    let client = target.client()?;
    match client.call(Method::POST, "/v1/reload", None).await {
        Ok(value) => {
            let done: Reloaded = decode(value)?;
            outln!(
                "reloaded: generation {}, {} policies, {} prefixes",
                done.generation,
                done.policies,
                done.prefixes
            );
            for w in &done.warnings {
                errln!("warning: {w}");
            }
            Ok(())
        }
        Err(ClientError::Api { code, message, .. }) if code == "reload_rejected" => {
            anyhow::bail!("{message}")
        }
        Err(e) => Err(e.into()),
    }
}
