//! `sessiongate events`: follows refused flows, and prompts before expiry, live.

use super::Target;
use crate::{
    events::{self, Event},
    outln,
};

/// `sessiongate events`: one line per refusal or prompt until interrupted.
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
            match serde_json::from_str::<Event>(line) {
                Ok(Event::Refused(r)) => outln!("{}", events::describe(&r)),
                Ok(Event::Expiring(e)) => outln!("{}", events::describe_expiring(&e)),
                Err(_) => outln!("{line}"),
            }
        })
        .await?;
    Ok(())
}
