//! `sessiongate events`: follows refused flows live.

use super::Target;
use crate::{
    events::{self, Refusal},
    outln,
};

/// `sessiongate events`: one line per refusal until interrupted.
pub(super) async fn execute(target: &Target, json: bool) -> anyhow::Result<()> {
    let client = target.client()?;
    client
        .stream_lines("/v1/events/stream", |line| {
            // Blank lines are the stream's keep-alives.
            if line.trim().is_empty() {
                return;
            }
            if json {
                outln!("{line}");
                return;
            }
            match serde_json::from_str::<Refusal>(line) {
                Ok(r) => outln!("{}", events::describe(&r)),
                Err(_) => outln!("{line}"),
            }
        })
        .await?;
    Ok(())
}
